//! Which image library transforms (issue #29): CPU time per image of the
//! proxy's libvips pipeline (`yatagarasu::images::transform::run`, the
//! code the pool runs) against the pure-Rust stack the other system uses
//! (`image` decoding and encoding, `fast_image_resize` Lanczos3, `webp`
//! for lossy WebP), with `vipsthumbnail` from libvips-tools in the same
//! run as the floor. One thread each (libvips' own pool is cut to one
//! thread by the proxy; VIPS_CONCURRENCY=1 for vipsthumbnail). CPU time is
//! getrusage's user + system (RUSAGE_SELF for the in-process candidates,
//! RUSAGE_CHILDREN for vipsthumbnail, which runs once over N copies so
//! its start-up is spread over them).
//!
//!   cargo run --release --manifest-path benches/imagelibs/Cargo.toml [N]
//!
//! Inputs are made by the `vips` command line: smooth noise (a photo's
//! frequency content more than a flat test card's), JPEG Q90, and a PNG
//! with an alpha band.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use yatagarasu::images::params::{self, Format};
use yatagarasu::images::plan::Limits;
use yatagarasu::images::transform::{self, Job, Sources};

fn cpu(who: i32) -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn vips(args: &[&str]) {
    let st = Command::new("vips").args(args).status().expect("vips");
    assert!(st.success(), "vips {args:?}");
}

/// A smooth-noise image of `w` x `h` with `bands` bands, saved as `out`.
fn make(dir: &Path, w: u32, h: u32, bands: u32, out: &str) -> PathBuf {
    let mut parts = Vec::new();
    for b in 0..bands {
        let n = dir.join(format!("n{b}.v"));
        let s = dir.join(format!("s{b}.v"));
        vips(&["gaussnoise", n.to_str().unwrap(), &w.to_string(), &h.to_string(), "--mean", "128", "--sigma", "90"]);
        vips(&["gaussblur", n.to_str().unwrap(), s.to_str().unwrap(), &(2 + b).to_string()]);
        parts.push(s.to_str().unwrap().to_string());
    }
    let joined = dir.join("j.v");
    vips(&["bandjoin", &parts.join(" "), joined.to_str().unwrap()]);
    let cast = dir.join("c.v");
    vips(&["cast", joined.to_str().unwrap(), cast.to_str().unwrap(), "uchar"]);
    let target = dir.join(out.split('[').next().unwrap_or(out));
    let spec = format!("{}{}", target.display(), out.find('[').map_or("", |i| &out[i..]));
    vips(&["copy", cast.to_str().unwrap(), &spec]);
    target
}

struct Case {
    name: &'static str,
    input: PathBuf,
    width: u32,
    format: Format,
}

/// The proxy's pipeline: CPU seconds per image.
fn libvips(case: &Case, n: usize) -> f64 {
    let input = bytes::Bytes::from(std::fs::read(&case.input).expect("input"));
    let query = format!("w={}&q=80", case.width);
    let p = params::parse(query.as_bytes()).expect("params").expect("some").0;
    let job = Job {
        input,
        params: p,
        format: case.format,
        quality: 80,
        limits: Limits { max_width: 8192, max_height: 8192 },
        marks: Vec::new(),
        source_ttl: Duration::from_secs(60),
    };
    let sources = Sources::default();
    transform::run(&job, &sources).expect("warm-up");
    let t0 = cpu(libc::RUSAGE_SELF);
    for _ in 0..n {
        let out = transform::run(&job, &sources).expect("transform");
        std::hint::black_box(out);
    }
    (cpu(libc::RUSAGE_SELF) - t0).as_secs_f64() / n as f64
}

/// `image` + `fast_image_resize` (+ `webp`): CPU seconds per image.
fn pure_rust(case: &Case, n: usize) -> f64 {
    use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let input = std::fs::read(&case.input).expect("input");
    let run = || {
        let img = image::load_from_memory(&input).expect("decode");
        let alpha = img.color().has_alpha();
        let (src, pt) = if alpha {
            (img.to_rgba8().into_raw(), PixelType::U8x4)
        } else {
            (img.to_rgb8().into_raw(), PixelType::U8x3)
        };
        let (w, h) = (img.width(), img.height());
        let src = Image::from_vec_u8(w, h, src, pt).expect("src");
        let dw = case.width;
        let dh = ((u64::from(h) * u64::from(dw) + u64::from(w) / 2) / u64::from(w)) as u32;
        let mut dst = Image::new(dw, dh, pt);
        Resizer::new()
            .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)))
            .expect("resize");
        let pixels = dst.buffer();
        match case.format {
            Format::Webp => {
                let enc = if alpha {
                    webp::Encoder::from_rgba(pixels, dw, dh)
                } else {
                    webp::Encoder::from_rgb(pixels, dw, dh)
                };
                enc.encode(80.0).to_vec()
            }
            _ => {
                let mut out = Vec::new();
                let rgb: Vec<u8> = if alpha {
                    pixels.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect()
                } else {
                    pixels.to_vec()
                };
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
                    .encode(&rgb, dw, dh, image::ExtendedColorType::Rgb8)
                    .expect("encode");
                out
            }
        }
    };
    std::hint::black_box(run());
    let t0 = cpu(libc::RUSAGE_SELF);
    for _ in 0..n {
        std::hint::black_box(run());
    }
    (cpu(libc::RUSAGE_SELF) - t0).as_secs_f64() / n as f64
}

/// `vipsthumbnail` over `n` copies in one run: CPU seconds per image.
fn vipsthumbnail(case: &Case, n: usize, dir: &Path) -> f64 {
    let copies = dir.join(format!("copies-{}", case.name.replace(' ', "-")));
    std::fs::create_dir_all(&copies).expect("dir");
    let ext = case.input.extension().and_then(|e| e.to_str()).unwrap_or("jpg");
    let files: Vec<String> = (0..n)
        .map(|i| {
            let f = copies.join(format!("{i}.{ext}"));
            std::fs::copy(&case.input, &f).expect("copy");
            f.to_str().unwrap().to_string()
        })
        .collect();
    let out = match case.format {
        Format::Webp => "%s-t.webp[Q=80,strip]",
        _ => "%s-t.jpg[Q=80,strip]",
    };
    let size = format!("{}x", case.width);
    let t0 = cpu(libc::RUSAGE_CHILDREN);
    let st = Command::new("vipsthumbnail")
        .env("VIPS_CONCURRENCY", "1")
        .args(&files)
        .args(["-s", &size, "-o", out])
        .status()
        .expect("vipsthumbnail");
    assert!(st.success());
    (cpu(libc::RUSAGE_CHILDREN) - t0).as_secs_f64() / n as f64
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    yatagarasu::images::vips::load().expect("libvips");
    let dir = std::env::temp_dir().join(format!("imagelibs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let hd = make(&dir, 1920, 1080, 3, "hd.jpg[Q=90]");
    let big = make(&dir, 4000, 3000, 3, "big.jpg[Q=90]");
    let alpha = make(&dir, 1920, 1080, 4, "alpha.png");
    let cases = [
        Case { name: "1920x1080 JPEG -> 400 JPEG q80", input: hd.clone(), width: 400, format: Format::Jpeg },
        Case { name: "1920x1080 JPEG -> 400 WebP q80", input: hd, width: 400, format: Format::Webp },
        Case { name: "4000x3000 JPEG -> 1200 JPEG q80", input: big, width: 1200, format: Format::Jpeg },
        Case { name: "1920x1080 PNG+alpha -> 400 WebP", input: alpha, width: 400, format: Format::Webp },
    ];
    println!("CPU ms per image, {n} images each, one thread (medians of 3 runs)");
    println!("| case | vipsthumbnail | yatagarasu (libvips) | ratio | image + fast_image_resize | ratio |");
    println!("|---|---|---|---|---|---|");
    for case in &cases {
        let median = |f: &dyn Fn() -> f64| {
            let mut v: Vec<f64> = (0..3).map(|_| f()).collect();
            v.sort_by(f64::total_cmp);
            v[1] * 1000.0
        };
        let floor = median(&|| vipsthumbnail(case, n, &dir));
        let ours = median(&|| libvips(case, n));
        let rust = median(&|| pure_rust(case, n));
        println!(
            "| {} | {floor:.2} | {ours:.2} | {:.2}x | {rust:.2} | {:.2}x |",
            case.name,
            ours / floor,
            rust / floor
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
