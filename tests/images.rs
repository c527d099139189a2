//! Image variants through real sockets: originals in s3s-fs, made by the
//! `vips` command line; every output decoded by `vipsheader` and `vips
//! getpoint` / `vips avg` (libvips-tools), never by the code under test.

mod support;

use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::http;
use support::rogue::{Gate, Rogue, Step};
use support::*;

const SECRET: &str = "images-test-secret-0123456789abcdef";

/// A binary PPM of `w` x `h` whose pixel (x, y) is `f(x, y)`.
fn ppm(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let mut out = format!("P6\n{w} {h}\n255\n").into_bytes();
    for y in 0..h {
        for x in 0..w {
            out.extend_from_slice(&f(x, y));
        }
    }
    out
}

/// Runs `vips`-family `cmd` with `args`: its standard output (libvips'
/// warnings go to standard error); panics with both on failure.
fn vips(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .expect(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// An image file made from `pixels` (a PPM) by `vips copy`, as `name`
/// (its extension and `[options]` choose the format).
fn encode(dir: &Path, pixels: &[u8], name: &str) -> Vec<u8> {
    let src = dir.join("src.ppm");
    std::fs::write(&src, pixels).expect("write ppm");
    let out = dir.join(name.split('[').next().unwrap_or(name));
    let target = format!(
        "{}{}",
        out.display(),
        name.find('[').map_or("", |i| &name[i..])
    );
    vips("vips", &["copy", src.to_str().unwrap(), &target]);
    std::fs::read(&out).expect("read encoded")
}

/// What `vipsheader` says of `bytes`: width, height, loader.
fn probe(dir: &Path, bytes: &[u8]) -> (u32, u32, String) {
    let f = dir.join("probe.bin");
    std::fs::write(&f, bytes).expect("write");
    let field = |name: &str| {
        vips("vipsheader", &["-f", name, f.to_str().unwrap()])
            .trim()
            .to_string()
    };
    (
        field("width").parse().expect("width"),
        field("height").parse().expect("height"),
        field("vips-loader"),
    )
}

/// The pixel of `bytes` at (x, y), one value per band.
fn pixel(dir: &Path, bytes: &[u8], x: u32, y: u32) -> Vec<f64> {
    let f = dir.join("pixel.bin");
    std::fs::write(&f, bytes).expect("write");
    vips(
        "vips",
        &[
            "getpoint",
            f.to_str().unwrap(),
            &x.to_string(),
            &y.to_string(),
        ],
    )
    .split_whitespace()
    .map(|v| v.parse().expect("number"))
    .collect()
}

/// The mean of every band over a region of `bytes`.
fn region_mean(dir: &Path, bytes: &[u8], region: (u32, u32, u32, u32)) -> f64 {
    region_stat(dir, bytes, region, "avg")
}

/// The mean of one band over a region of `bytes`.
fn band_mean(dir: &Path, bytes: &[u8], region: (u32, u32, u32, u32), band: u32) -> f64 {
    let f = dir.join("band-in.bin");
    let b = dir.join("band.png");
    std::fs::write(&f, bytes).expect("write");
    vips(
        "vips",
        &[
            "extract_band",
            f.to_str().unwrap(),
            b.to_str().unwrap(),
            &band.to_string(),
        ],
    );
    region_stat(dir, &std::fs::read(&b).expect("band"), region, "avg")
}

/// The standard deviation over a region of `bytes` (about 0 where the
/// image is one flat colour, large where something was drawn).
fn region_spread(dir: &Path, bytes: &[u8], region: (u32, u32, u32, u32)) -> f64 {
    region_stat(dir, bytes, region, "deviate")
}

fn region_stat(dir: &Path, bytes: &[u8], (x, y, w, h): (u32, u32, u32, u32), stat: &str) -> f64 {
    let f = dir.join("region.bin");
    let c = dir.join("region.v");
    std::fs::write(&f, bytes).expect("write");
    vips(
        "vips",
        &[
            "crop",
            f.to_str().unwrap(),
            c.to_str().unwrap(),
            &x.to_string(),
            &y.to_string(),
            &w.to_string(),
            &h.to_string(),
        ],
    );
    vips("vips", &[stat, c.to_str().unwrap()])
        .trim()
        .parse()
        .expect("number")
}

fn near(a: &[f64], b: [f64; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 40.0)
}

const RED: [u8; 3] = [230, 20, 20];
const BLUE: [u8; 3] = [20, 20, 230];
const GREY: [u8; 3] = [128, 128, 128];

/// An s3s-fs origin holding `objects` in bucket `imgs`.
fn origin(objects: &[(&str, &[u8])]) -> S3 {
    let s3 = S3::start();
    s3.create_bucket("imgs");
    for (k, v) in objects {
        s3.put("imgs", k, v);
    }
    s3
}

fn config(endpoint: &str, top: &str, bucket_extra: &str) -> String {
    format!(
        "{top}cache:\n  enabled: true\nbuckets:\n  - name: \"img\"\n    path_prefix: \"/img\"\n{bucket_extra}    s3:\n      bucket: \"imgs\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n"
    )
}

const ON: &str = "image_optimization:\n  enabled: true\n";

fn transforms(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "yatagarasu_image_transforms_total{{result=\"{result}\"}}"
        ))
        .unwrap_or(0.0)
}

/// A 1920x1080 JPEG: left half red, right half blue.
fn halves(dir: &Path) -> Vec<u8> {
    encode(
        dir,
        &ppm(1920, 1080, |x, _| if x < 960 { RED } else { BLUE }),
        "h.jpg[Q=95]",
    )
}

#[test]
fn resizes_and_converts_with_one_variant_per_normalized_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let proxy = Proxy::start(&config(&s3.endpoint(), ON, ""));
    let r = proxy.get("/img/photo.jpg?w=400");
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/jpeg"))
    );
    assert_eq!(probe(d, &r.body), (400, 225, "jpegload".into()));
    for (q, loader, ctype) in [
        ("w=400&fmt=webp", "webpload", "image/webp"),
        ("w=300&fmt=png", "pngload", "image/png"),
        ("w=200&fmt=avif", "heifload", "image/avif"),
        ("h=270&fmt=jpeg&q=50", "jpegload", "image/jpeg"),
    ] {
        let r = proxy.get(&format!("/img/photo.jpg?{q}"));
        assert_eq!(
            (r.status, r.header("content-type")),
            (200, Some(ctype)),
            "{q}"
        );
        let (w, h, l) = probe(d, &r.body);
        assert_eq!(l, loader, "{q}");
        assert!(
            (w * 1080).abs_diff(h * 1920) <= 1920,
            "aspect kept for {q}: {w}x{h}"
        );
    }
    // The same variant asked another way: one entry, a hit.
    let r = proxy.get("/img/photo.jpg?fmt=webp&w=400&fit=contain&dpr=1");
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert_eq!(transforms(&proxy, "ok"), 5.0);
    // The original answers as it is stored.
    let plain = proxy.get("/img/photo.jpg");
    assert!(
        plain.body == halves_bytes(&s3),
        "the original, byte for byte"
    );
    // dpr and percentages.
    let r = proxy.get("/img/photo.jpg?w=200&dpr=2");
    assert_eq!(probe(d, &r.body).0, 400);
    let r = proxy.get("/img/photo.jpg?w=25p");
    assert_eq!(probe(d, &r.body).0, 480);
}

fn halves_bytes(s3: &S3) -> Vec<u8> {
    std::fs::read(s3.dir.path().join("imgs").join("photo.jpg")).expect("origin file")
}

#[test]
fn fits_and_gravity_place_the_image_where_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Tall: top half red, bottom half blue.
    let tall = encode(
        d,
        &ppm(500, 1000, |_, y| if y < 500 { RED } else { BLUE }),
        "t.png",
    );
    let s3 = origin(&[("tall.png", &tall)]);
    let proxy = Proxy::start(&config(&s3.endpoint(), ON, ""));
    let get = |q: &str| {
        let r = proxy.get(&format!("/img/tall.png?{q}"));
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        r.body
    };
    for (fit, size) in [
        ("contain", (150, 300)),
        ("inside", (150, 300)),
        ("fill", (300, 300)),
        ("cover", (300, 300)),
        ("outside", (300, 600)),
        ("pad", (300, 300)),
    ] {
        let (w, h, _) = probe(d, &get(&format!("w=300&h=300&fit={fit}")));
        assert_eq!((w, h), size, "fit={fit}");
    }
    // Cover crops the overflow at the gravity.
    let north = get("w=300&h=300&fit=cover&g=north");
    assert!(
        near(&pixel(d, &north, 150, 150), [230.0, 20.0, 20.0]),
        "north keeps the top"
    );
    let south = get("w=300&h=300&fit=cover&g=south");
    assert!(
        near(&pixel(d, &south, 150, 150), [20.0, 20.0, 230.0]),
        "south keeps the bottom"
    );
    let smart = get("w=300&h=300&fit=cover&g=smart");
    assert_eq!(probe(d, &smart).0, 300);
    // Pad: the image at its gravity, the rest the background.
    let pad = get("w=400&h=300&fit=pad&bg=00ff00&fmt=jpeg&g=west");
    assert!(
        near(&pixel(d, &pad, 390, 150), [0.0, 255.0, 0.0]),
        "background on the east"
    );
    assert!(
        near(&pixel(d, &pad, 10, 10), [230.0, 20.0, 20.0]),
        "image on the west"
    );
    // Inside never enlarges.
    assert_eq!(probe(d, &get("w=1000&h=2000&fit=inside")).0, 500);
}

/// `jpeg` with an EXIF APP1 segment saying `orientation` (1-8).
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    // TIFF, little-endian, one IFD entry: Orientation (0x0112), SHORT.
    let mut tiff = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn rotation_flips_exif_and_effects_change_the_pixels_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wide = halves(d);
    let turned = with_orientation(&wide, 6);
    let grey = encode(d, &ppm(400, 200, |_, _| GREY), "g.jpg[Q=95]");
    let s3 = origin(&[
        ("photo.jpg", &wide),
        ("turned.jpg", &turned),
        ("grey.jpg", &grey),
    ]);
    let proxy = Proxy::start(&config(&s3.endpoint(), ON, ""));
    let get = |p: &str| {
        let r = proxy.get(p);
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        r.body
    };
    let r = get("/img/photo.jpg?w=400&rot=90");
    assert_eq!(probe(d, &r).0, 400, "rot=90: w is the rotated width");
    assert_eq!(probe(d, &r).1, 711);
    assert!(
        near(&pixel(d, &r, 200, 50), [230.0, 20.0, 20.0]),
        "the left (red) is on top"
    );
    let r = get("/img/photo.jpg?w=400&flip=h");
    assert!(
        near(&pixel(d, &r, 10, 100), [20.0, 20.0, 230.0]),
        "flipped: blue on the left"
    );
    let r = get("/img/photo.jpg?w=400&flip=v");
    assert!(
        near(&pixel(d, &r, 10, 100), [230.0, 20.0, 20.0]),
        "a vertical flip keeps red left"
    );
    // EXIF orientation 6 (turned a quarter): upright by default.
    let (w, h, _) = probe(d, &get("/img/turned.jpg?w=300"));
    assert!(h > w, "auto-rotated: {w}x{h}");
    let (w, h, _) = probe(d, &get("/img/turned.jpg?w=300&auto_rotate=0"));
    assert!(w > h, "as stored: {w}x{h}");
    let r = get("/img/photo.jpg?w=400&grayscale=1");
    let p = pixel(d, &r, 10, 100);
    assert!(
        (p[0] - p[1]).abs() < 3.0 && (p[1] - p[2]).abs() < 3.0,
        "grey: {p:?}"
    );
    let r = get("/img/photo.jpg?w=400&saturation=-100");
    let p = pixel(d, &r, 10, 100);
    assert!((p[0] - p[2]).abs() < 25.0, "desaturated: {p:?}");
    let bright = region_mean(d, &get("/img/grey.jpg?brightness=50"), (0, 0, 400, 200));
    let dark = region_mean(d, &get("/img/grey.jpg?brightness=-50"), (0, 0, 400, 200));
    assert!(
        bright > 200.0 && dark < 60.0,
        "brightness: {bright} / {dark}"
    );
    let flat = region_mean(d, &get("/img/grey.jpg?contrast=100"), (0, 0, 400, 200));
    assert!(
        (flat - 128.0).abs() < 8.0,
        "contrast keeps mid grey: {flat}"
    );
    // Quality: fewer bytes at a lower q.
    let q30 = get("/img/photo.jpg?w=400&q=30").len();
    let q95 = get("/img/photo.jpg?w=400&q=95").len();
    assert!(q30 < q95, "q=30 {q30} bytes, q=95 {q95}");
    // Blur softens the red/blue edge; sharpen keeps the size.
    let blurred = get("/img/photo.jpg?w=400&blur=10");
    let edge = pixel(d, &blurred, 200, 100);
    assert!(
        edge[0] > 60.0 && edge[2] > 60.0,
        "the edge is mixed: {edge:?}"
    );
    // Contrast pushes the red half's channels apart (230 and 20 become
    // about 255 and 0); sharpening overshoots at the red/blue edge.
    let p = pixel(d, &get("/img/photo.jpg?w=400&contrast=50"), 10, 100);
    assert!(p[0] > 245.0 && p[2] < 8.0, "contrast: {p:?}");
    let plain = get("/img/photo.jpg?w=400");
    let sharp = get("/img/photo.jpg?w=400&sharpen=2");
    assert_eq!(probe(d, &sharp).0, 400);
    // Across the red/blue edge (x = 200) the sharpened pixels overshoot.
    let moved: f64 = (196..204)
        .map(|x| {
            let (a, b) = (pixel(d, &sharp, x, 100), pixel(d, &plain, x, 100));
            a.iter().zip(&b).map(|(a, b)| (a - b).abs()).sum::<f64>()
        })
        .sum();
    assert!(
        moved > 40.0,
        "sharpening moved the edge's pixels by {moved}"
    );
}

#[test]
fn fmt_auto_follows_accept_and_each_choice_is_its_own_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let proxy = Proxy::start(&config(&s3.endpoint(), ON, ""));
    let get = |accept: &str| {
        http::get(
            proxy.port,
            "/img/photo.jpg?w=300&fmt=auto",
            &[("Accept", accept)],
        )
    };
    let webp = get("image/avif,image/webp,*/*");
    assert_eq!(webp.header("content-type"), Some("image/webp"));
    assert_eq!(webp.header("vary"), Some("Accept"));
    assert_eq!(probe(d, &webp.body).2, "webpload");
    let avif = get("image/avif,*/*;q=0.8");
    assert_eq!(avif.header("content-type"), Some("image/avif"));
    assert_eq!(avif.header("x-cache"), Some("MISS"));
    let jpeg = get("*/*");
    assert_eq!(probe(d, &jpeg.body).2, "jpegload");
    assert_eq!(get("image/webp").header("x-cache"), Some("HIT"));
    assert_eq!(get("image/avif").header("x-cache"), Some("HIT"));
}

#[test]
fn head_ranges_and_conditionals_are_answered_on_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let proxy = Proxy::start(&config(&s3.endpoint(), ON, ""));
    // HEAD first: the variant is made to know its length.
    let head = http::head(proxy.port, "/img/photo.jpg?w=320&fmt=webp");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let whole = proxy.get("/img/photo.jpg?w=320&fmt=webp");
    assert_eq!(whole.header("x-cache"), Some("HIT"));
    assert_eq!(
        head.header("content-length").map(str::to_string),
        Some(whole.body.len().to_string())
    );
    let etag = whole.header("etag").expect("etag").to_string();
    let original = proxy.get("/img/photo.jpg");
    assert_ne!(original.header("etag"), Some(etag.as_str()));
    assert_ne!(
        proxy.get("/img/photo.jpg?w=321&fmt=webp").header("etag"),
        Some(etag.as_str())
    );
    let part = http::get(
        proxy.port,
        "/img/photo.jpg?w=320&fmt=webp",
        &[("Range", "bytes=0-9")],
    );
    assert_eq!((part.status, &part.body[..]), (206, &whole.body[..10]));
    let not_modified = http::get(
        proxy.port,
        "/img/photo.jpg?fmt=webp&w=320",
        &[("If-None-Match", &etag)],
    );
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
}

#[test]
fn purging_an_original_purges_its_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let token = "0123456789abcdef-admin";
    let proxy = Proxy::start(&format!(
        "admin:\n  token: \"{token}\"\n{}",
        config(&s3.endpoint(), ON, "")
    ));
    assert_eq!(
        proxy.get("/img/photo.jpg?w=100").header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        proxy.get("/img/photo.jpg?w=100").header("x-cache"),
        Some("HIT")
    );
    // The original was kept when the variant was made: the next variant
    // needs no origin request, and the plain object is a hit.
    assert_eq!(proxy.get("/img/photo.jpg").header("x-cache"), Some("HIT"));
    let r = http::with_bearer(
        proxy.metrics_port,
        "POST",
        "/admin/cache/purge/img/photo.jpg",
        Some(token),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("\"purged\":2"),
        "original and variant: {}",
        r.text()
    );
    assert_eq!(
        proxy.get("/img/photo.jpg?w=100").header("x-cache"),
        Some("MISS")
    );
}

/// A PNG header claiming `w` x `h`, then bytes that are no image data.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    v.extend_from_slice(&[0x55; 4096]);
    v
}

#[test]
fn bombs_and_oversized_originals_are_refused_without_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Noise does not compress: well above 1 MiB as a PNG.
    let noise = |x: u32, y: u32| {
        let v =
            (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        [(v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8]
    };
    let big = encode(d, &ppm(1000, 1000, noise), "big.png");
    assert!(big.len() > 1024 * 1024, "{} bytes", big.len());
    let corrupt = {
        let mut j = halves(d);
        let n = j.len();
        for b in &mut j[600..n - 2] {
            *b = 0x42;
        }
        j
    };
    let s3 = origin(&[
        ("bomb.png", &png_bomb(50_000, 50_000)),
        ("big.png", &big),
        ("notes.png", b"just text, not an image"),
        ("corrupt.jpg", &corrupt),
        ("photo.jpg", &halves(d)),
    ]);
    let top = "image_optimization:\n  enabled: true\n  max_input_mb: 1\n";
    let proxy = Proxy::start(&config(&s3.endpoint(), top, ""));
    let r = proxy.get("/img/bomb.png?w=100");
    assert_eq!(r.status, 422);
    assert!(r.text().contains("50000x50000"), "{}", r.text());
    let r = proxy.get("/img/big.png?w=100");
    assert_eq!(r.status, 422);
    assert!(r.text().contains("max_input_mb"), "{}", r.text());
    let r = proxy.get("/img/notes.png?w=100");
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(transforms(&proxy, "refused"), 3.0);
    assert_eq!(
        (transforms(&proxy, "ok"), transforms(&proxy, "failed")),
        (0.0, 0.0),
        "nothing decoded"
    );
    // A codec error is that request's 500; the next is served.
    let r = proxy.get("/img/corrupt.jpg?w=100");
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(transforms(&proxy, "failed"), 1.0);
    assert_eq!(proxy.get("/img/photo.jpg?w=100").status, 200);
    // Sizes past the limits: refused before any fetch.
    let r = proxy.get("/img/photo.jpg?w=5000");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("max_width"), "{}", r.text());
    let r = proxy.get("/img/photo.jpg?w=abc");
    assert_eq!(
        (r.status, r.text().trim()),
        (
            400,
            "image parameter 'w' must be pixels (1 or more) or a percentage (1p to 1000p)"
        )
    );
}

fn hmac_hex(key: &str, message: &str) -> String {
    // HMAC-SHA256 by `openssl dgst`, as a client would sign.
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(message.as_bytes())?;
            child.wait_with_output()
        })
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn signed_urls_and_size_allowlists_bound_what_clients_may_ask_for() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let key = "sign-me-0123456789abcdef";
    let top = format!(
        "image_optimization:\n  enabled: true\n  signing_key: \"{key}\"\n  allowed_widths: [200, 400]\n"
    );
    let proxy = Proxy::start(&config(&s3.endpoint(), &top, ""));
    assert_eq!(proxy.get("/img/photo.jpg?w=200").status, 403, "unsigned");
    let sig = hmac_hex(key, "/img/photo.jpg?w=200");
    let r = proxy.get(&format!("/img/photo.jpg?w=200&sig={sig}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(probe(d, &r.body).0, 200);
    assert_eq!(
        proxy.get(&format!("/img/photo.jpg?w=400&sig={sig}")).status,
        403,
        "another size"
    );
    let exp = unix_now() - 10;
    let sig = hmac_hex(key, &format!("/img/photo.jpg?w=200&exp={exp}"));
    let r = proxy.get(&format!("/img/photo.jpg?w=200&exp={exp}&sig={sig}"));
    assert_eq!(r.status, 403);
    assert!(r.text().contains("expired"), "{}", r.text());
    let sig = hmac_hex(key, "/img/photo.jpg?w=300");
    let r = proxy.get(&format!("/img/photo.jpg?w=300&sig={sig}"));
    assert_eq!(r.status, 400, "signed but not an allowed width");
    assert!(r.text().contains("allowed_widths"), "{}", r.text());
    // The original needs no signature.
    assert_eq!(proxy.get("/img/photo.jpg").status, 200);
}

#[test]
fn without_images_the_same_parameters_pass_through_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let photo = halves(d);
    let s3 = origin(&[("photo.jpg", &photo), ("notes.txt", b"w is not for text")]);
    let off = Proxy::start(&config(&s3.endpoint(), "", ""));
    assert!(off.get("/img/photo.jpg?w=100&fmt=webp").body == photo);
    let on = Proxy::start(&config(&s3.endpoint(), ON, ""));
    assert_eq!(on.get("/img/notes.txt?w=100").body, b"w is not for text");
    assert!(on.get("/img/photo.jpg?x=1&utm_source=a").body == photo);
    // A bucket can turn images off under a global on.
    let own = "    image_optimization:\n      enabled: false\n";
    let per_bucket = Proxy::start(&config(&s3.endpoint(), ON, own));
    assert!(per_bucket.get("/img/photo.jpg?w=100").body == photo);
}

/// A PNG watermark source served by a gated origin: every fetch of it
/// waits for `gate`.
fn gated_logo(d: &Path, gate: &Gate) -> Rogue {
    let logo = encode(d, &ppm(60, 30, |_, _| [0, 255, 0]), "logo.png");
    let gate = gate.clone();
    Rogue::start(move |_| {
        vec![
            Step::Wait(gate.clone()),
            support::rogue::ok_with("Content-Type: image/png\r\n", &logo),
        ]
    })
}

#[test]
fn a_full_pool_answers_503_and_a_burst_makes_one_transform() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = origin(&[("photo.jpg", &halves(d))]);
    let gate = Gate::default();
    let logo = gated_logo(d, &gate);
    let top = "image_optimization:\n  enabled: true\n  max_concurrent: 1\n  max_queue: 1\n";
    let mark = format!(
        "    watermark:\n      enabled: true\n      rules:\n        - pattern: \"**\"\n          watermarks:\n            - type: image\n              source: \"{}/logo.png\"\n              position: top-left\n",
        logo.endpoint()
    );
    let proxy = Proxy::start(&config(&s3.endpoint(), top, &mark));
    let port = proxy.port;
    // Ten clients on one variant, one on another: the first variant's
    // transform holds the one thread (its watermark source waits), the
    // second's waits in the queue.
    let burst: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || http::get(port, "/img/photo.jpg?w=100", &[])))
        .collect();
    let queued = std::thread::spawn(move || http::get(port, "/img/photo.jpg?w=101", &[]));
    assert!(
        proxy.wait_metric(
            "yatagarasu_image_transforms_queued",
            2.0,
            Duration::from_secs(30)
        ),
        "{}",
        proxy.metrics()
    );
    let r = proxy.get("/img/photo.jpg?w=102");
    assert_eq!(
        (r.status, r.header("retry-after")),
        (503, Some("1")),
        "{}",
        r.text()
    );
    assert_eq!(transforms(&proxy, "busy"), 1.0);
    gate.open();
    for t in burst {
        let r = t.join().expect("client");
        assert_eq!(r.status, 200);
        assert_eq!(probe(d, &r.body).0, 100);
    }
    assert_eq!(queued.join().expect("client").status, 200);
    assert_eq!(transforms(&proxy, "ok"), 2.0, "one transform per variant");
    assert_eq!(
        proxy.get("/img/photo.jpg?w=102").status,
        200,
        "served once there is room"
    );
}

fn wm_bucket(marks: &str) -> String {
    format!(
        "    auth:\n      enabled: true\n    watermark:\n      enabled: true\n      cache_ttl_seconds: 60\n      rules:\n        - pattern: \"**/*.jpg\"\n          watermarks:\n{marks}"
    )
}

#[test]
fn watermarks_are_drawn_where_they_say_and_never_shared_across_viewers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let grey = encode(d, &ppm(800, 600, |_, _| GREY), "g.jpg[Q=95]");
    let logo = encode(d, &ppm(60, 30, |_, _| [0, 255, 0]), "logo.png");
    let logo_path = d.join("logo.png");
    std::fs::write(&logo_path, &logo).expect("logo");
    let s3 = origin(&[
        ("grey.jpg", &grey),
        ("grey.png", &encode(d, &ppm(80, 60, |_, _| GREY), "g2.png")),
    ]);
    let marks = format!(
        "            - type: text\n              text: \"Licensed to {{{{jwt.sub}}}}\"\n              font_size: 40\n              color: \"#FF0000\"\n              opacity: 1.0\n              position: bottom-right\n              margin: 10\n            - type: image\n              source: \"{}\"\n              opacity: 1.0\n              position: top-left\n              margin: 0\n            - type: text\n              text: \"INVISIBLE\"\n              font_size: 40\n              opacity: 0.0\n              position: top-right\n",
        logo_path.display()
    );
    let top =
        format!("jwt:\n  enabled: true\n  algorithm: \"HS256\"\n  secret: \"{SECRET}\"\n{ON}");
    let proxy = Proxy::start(&config(&s3.endpoint(), &top, &wm_bucket(&marks)));
    let as_user = |sub: &str, q: &str| {
        let mut claims = json!({"sub": sub});
        claims["exp"] = json!(unix_now() + 3600);
        let auth = format!("Bearer {}", hs256_token(SECRET, &claims));
        http::get(
            proxy.port,
            &format!("/img/grey.jpg{q}"),
            &[("Authorization", &auth)],
        )
    };
    let ann = as_user("ann", "");
    assert_eq!(ann.status, 200, "{}", ann.text());
    assert_eq!(probe(d, &ann.body), (800, 600, "jpegload".into()));
    // The text's corner differs from the grey original; the opposite one
    // does not, and the logo is in the top left.
    let corner = region_spread(d, &ann.body, (400, 520, 390, 70));
    let untouched = region_spread(d, &ann.body, (300, 100, 200, 200));
    assert!(untouched < 3.0, "{untouched}");
    assert!(corner > 10.0, "text drawn bottom right: {corner}");
    assert!(
        region_spread(d, &ann.body, (0, 520, 200, 70)) < 3.0,
        "nothing bottom left"
    );
    let (red, green) = (
        band_mean(d, &ann.body, (400, 520, 390, 70), 0),
        band_mean(d, &ann.body, (400, 520, 390, 70), 1),
    );
    assert!(red > green + 5.0, "the text is red: R {red}, G {green}");
    assert!(
        region_spread(d, &ann.body, (600, 0, 200, 100)) < 3.0,
        "opacity 0 draws nothing"
    );
    assert!(
        near(&pixel(d, &ann.body, 30, 15), [0.0, 255.0, 0.0]),
        "logo top left"
    );
    let bob = as_user("bob", "");
    assert_ne!(ann.body, bob.body, "another viewer, another text");
    assert_eq!(bob.header("x-cache"), Some("MISS"));
    assert_eq!(as_user("ann", "").header("x-cache"), Some("HIT"));
    // Parameters and watermarks together; PNG files match no rule here.
    let small = as_user("ann", "?w=400");
    assert_eq!(probe(d, &small.body).0, 400);
    let png = http::get(
        proxy.port,
        "/img/grey.png",
        &[(
            "Authorization",
            &format!(
                "Bearer {}",
                hs256_token(SECRET, &json!({"sub": "ann", "exp": unix_now() + 60}))
            ),
        )],
    );
    assert_eq!(png.status, 200);
    assert!(png.body == std::fs::read(s3.dir.path().join("imgs/grey.png")).expect("png"));
}

#[test]
fn tiled_and_diagonal_marks_cover_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let grey = encode(d, &ppm(900, 900, |_, _| GREY), "g.jpg[Q=95]");
    let s3 = origin(&[("a.jpg", &grey), ("b/c.jpg", &grey)]);
    let bucket = "    watermark:\n      enabled: true\n      rules:\n        - pattern: \"/img/a.jpg\"\n          watermarks:\n            - type: text\n              text: \"SAMPLE\"\n              font_size: 48\n              color: \"#000000\"\n              opacity: 1.0\n              position: tiled\n              tile_spacing: 40\n              rotation: -30\n        - pattern: \"**\"\n          watermarks:\n            - type: text\n              text: \"PREVIEW ONLY\"\n              font_size: 36\n              color: \"#000000\"\n              opacity: 1.0\n              position: diagonal-band\n";
    let proxy = Proxy::start(&config(&s3.endpoint(), "", bucket));
    let tiled = proxy.get("/img/a.jpg");
    assert_eq!(tiled.status, 200, "{}", tiled.text());
    // Every third of the image has ink.
    for (x, y) in [(0, 0), (300, 300), (600, 600), (600, 0), (0, 600)] {
        let m = region_spread(d, &tiled.body, (x, y, 300, 300));
        assert!(m > 10.0, "tiled ink at ({x},{y}): {m}");
    }
    let band = proxy.get("/img/b/c.jpg");
    let on = region_spread(d, &band.body, (300, 300, 300, 300));
    let off = region_spread(d, &band.body, (650, 0, 250, 250));
    assert!(on > 10.0 && off < 3.0, "diagonal: {on} on, {off} off");
}

/// `yaml` without the top-level sections `names`.
fn without_sections(yaml: &str, names: &[&str]) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in yaml.lines() {
        let top_level = !line.starts_with(' ') && !line.starts_with('#') && line.contains(':');
        if top_level {
            skipping = names.iter().any(|n| line.starts_with(&format!("{n}:")));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The other system's watermark example (examples/docker-compose/watermark,
/// as published), loaded as it is.
const THEIR_WATERMARK_CONFIG: &str = include_str!("fixtures/other-system/watermark.yaml");

#[test]
fn the_other_system_s_watermark_config_checks_and_runs() {
    let env = [
        ("JWT_SECRET", SECRET),
        ("AWS_ACCESS_KEY", AK),
        ("AWS_SECRET_KEY", SK),
    ];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = d.join("their.yaml");
    std::fs::write(&path, THEIR_WATERMARK_CONFIG).expect("write");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"));
    cmd.args(["--check", "--config", path.to_str().unwrap()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (ok, out) = run_command(&mut cmd);
    assert!(ok, "{out}");
    // Run it: its MinIO is ours (s3s-fs, every bucket name it uses) and its
    // logo comes from a local server (tests reach loopback only).
    let grey = encode(d, &ppm(640, 480, |_, _| GREY), "g.jpg[Q=95]");
    let s3 = S3::start();
    for b in ["public-assets", "premium-assets", "documents"] {
        s3.create_bucket(b);
    }
    s3.put("premium-assets", "p.jpg", &grey);
    s3.put("documents", "d.jpg", &grey);
    let gate = Gate::default();
    gate.open();
    let logo = gated_logo(d, &gate);
    let body = THEIR_WATERMARK_CONFIG
        .replace("http://minio:9000", &s3.endpoint())
        .replace(
            "https://raw.githubusercontent.com/julianshen/yatagarasu/master/website/assets/images/logo.png",
            &format!("{}/logo.png", logo.endpoint()),
        );
    // Its server and metrics sections give way to the test's ports.
    let body = without_sections(&body, &["server", "metrics"]);
    let proxy = Proxy::start_with(&body, 2, &env);
    let r = proxy.get("/preview/p.jpg");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(probe(d, &r.body).0, 640);
    let corner = region_spread(d, &r.body, (340, 400, 290, 70));
    assert!(corner > 10.0, "PREVIEW text bottom right: {corner}");
    let mut claims = json!({"sub": "reader@example.com"});
    claims["exp"] = json!(unix_now() + 3600);
    let auth = format!("Bearer {}", hs256_token(SECRET, &claims));
    let doc = http::get(proxy.port, "/docs/d.jpg", &[("Authorization", &auth)]);
    assert_eq!(doc.status, 200, "{}", doc.text());
    assert_ne!(doc.body, grey, "watermarked with the reader's identity");
    assert_eq!(http::get(proxy.port, "/docs/d.jpg", &[]).status, 401);
}
