//! One transform, start to end, on a pool thread (never on a core): the
//! original's header, the plan, then libvips: scale (shrinking on load),
//! rotate, flip, crop or pad, effects, watermarks, encode.
//!
//! [`inspect`] runs on the core before a job is queued: it reads the
//! format and size from the header bytes alone, so an image too large to
//! decode is refused without decoding anything.

use super::params::{Fit, Format, Params};
use super::plan::{self, Crop, Limits};
use super::vips::{self, Image, SaveAs, Thumb};
use super::watermark::{Drawn, DrawnKind, Position};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One transform to run.
pub struct Job {
    /// The original's bytes.
    pub input: Bytes,
    /// What to do.
    pub params: Params,
    /// The output format, resolved (`auto` chosen, or the original's).
    pub format: Format,
    /// Encoder quality (1-100) where the format has one.
    pub quality: u8,
    /// Largest output.
    pub limits: Limits,
    /// Watermarks, rendered for this request.
    pub marks: Vec<Drawn>,
    /// How long a fetched image watermark is kept (`cache_ttl_seconds`).
    pub source_ttl: Duration,
}

/// An encoded variant.
#[derive(Debug)]
pub struct Output {
    /// The encoded image.
    pub body: Vec<u8>,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
}

/// Why there is no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request asks for what the limits refuse (400).
    Refused(String),
    /// Not an image this proxy decodes (415).
    Unsupported(String),
    /// Too large to decode (422).
    TooLarge(String),
    /// The codec or a watermark source failed (500 for this request only).
    Failed(String),
}

/// What the header says of an original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceInfo {
    /// The format a variant keeps when `fmt` is not given.
    pub format: Format,
    /// Width in pixels, as stored (before EXIF orientation).
    pub width: u32,
    /// Height in pixels, as stored.
    pub height: u32,
    /// Whether it may hold transparency (PNG, WebP, GIF, AVIF).
    pub alpha: bool,
}

/// Reads format and size from the header bytes only (no decoding) and
/// checks them against `max_pixels`.
pub fn inspect(input: &[u8], max_pixels: u64) -> Result<SourceInfo, Failure> {
    use imagesize::ImageType;
    let unsupported = || {
        Failure::Unsupported(
            "the object is not an image this proxy transforms (JPEG, PNG, WebP, GIF, AVIF)".into(),
        )
    };
    let kind = imagesize::image_type(input).map_err(|_| unsupported())?;
    let (format, alpha) = match kind {
        ImageType::Jpeg => (Format::Jpeg, false),
        ImageType::Png => (Format::Png, true),
        ImageType::Webp => (Format::Webp, true),
        ImageType::Gif => (Format::Png, true),
        ImageType::Heif(imagesize::Compression::Av1) => (Format::Avif, true),
        _ => return Err(unsupported()),
    };
    let size = imagesize::blob_size(input).map_err(|_| unsupported())?;
    let (w, h) = (size.width as u64, size.height as u64);
    if w == 0 || h == 0 {
        return Err(unsupported());
    }
    if w.saturating_mul(h) > max_pixels {
        return Err(Failure::TooLarge(format!(
            "the original is {w}x{h} ({} pixels), above image_optimization.max_input_pixels ({max_pixels})",
            w.saturating_mul(h)
        )));
    }
    Ok(SourceInfo {
        format,
        width: w as u32,
        height: h as u32,
        alpha,
    })
}

/// A fetched watermark image and when it was fetched.
type Kept = (Instant, Arc<Vec<u8>>);

/// Image watermarks by source, fetched once per `ttl` (shared by the
/// pool's threads).
#[derive(Default)]
pub struct Sources {
    kept: Mutex<HashMap<String, Kept>>,
}

/// Largest image watermark read.
const MAX_SOURCE_BYTES: u64 = 8 * 1024 * 1024;

impl Sources {
    /// The bytes of `source` (a URL or a file path), from the copy kept
    /// if it is younger than `ttl`.
    pub fn get(&self, source: &str, ttl: Duration) -> Result<Arc<Vec<u8>>, String> {
        {
            let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, bytes)) = kept.get(source) {
                if at.elapsed() < ttl {
                    return Ok(bytes.clone());
                }
            }
        }
        let bytes = Arc::new(fetch(source)?);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= 256 {
            kept.clear();
        }
        kept.insert(source.to_string(), (Instant::now(), bytes.clone()));
        Ok(bytes)
    }
}

fn fetch(source: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let why = |e: &dyn std::fmt::Display| format!("watermark image {source}: {e}");
    let mut out = Vec::new();
    if source.starts_with("http://") || source.starts_with("https://") {
        let resp = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build()
            .get(source)
            .call()
            .map_err(|e| why(&e))?;
        resp.into_reader()
            .take(MAX_SOURCE_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| why(&e))?;
    } else {
        let path = source.strip_prefix("file://").unwrap_or(source);
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SOURCE_BYTES + 1).read_to_end(&mut out))
            .map_err(|e| why(&e))?;
    }
    if out.len() as u64 > MAX_SOURCE_BYTES {
        return Err(why(&"larger than 8 MiB"));
    }
    Ok(out)
}

/// Runs `job`: `Err` for a request the limits refuse or a codec failure.
pub fn run(job: &Job, sources: &Sources) -> Result<Output, Failure> {
    let source_ttl = job.source_ttl;
    let failed = Failure::Failed;
    let header = vips::header(&job.input).map_err(failed)?;
    let p = &job.params;
    let (mut w, mut h) = (header.width, header.height);
    // EXIF orientations 5-8 turn the image a quarter.
    if p.auto_rotate && header.orientation >= 5 {
        std::mem::swap(&mut w, &mut h);
    }
    let quarter = p.rotate == 90 || p.rotate == 270;
    let upright = if quarter { (h, w) } else { (w, h) };
    let plan = plan::plan(upright, p, job.limits).map_err(|e| Failure::Refused(e.0))?;
    let (tw, th) = if quarter {
        (plan.scale_to.1, plan.scale_to.0)
    } else {
        plan.scale_to
    };
    let (size, how) = match plan.crop {
        Crop::Smart { size } if quarter => ((size.1, size.0), Thumb::Smart),
        Crop::Smart { size } => (size, Thumb::Smart),
        _ => ((tw, th), Thumb::Exact),
    };
    let mut img = vips::thumbnail(&job.input, size, how, !p.auto_rotate).map_err(failed)?;
    img = img.colourspace(vips::INTERPRETATION_SRGB).map_err(failed)?;
    if p.rotate != 0 {
        img = img
            .rot(vips::ANGLE_D90 * (p.rotate / 90) as i32)
            .map_err(failed)?;
    }
    if p.flip.horizontal {
        img = img.flip(vips::DIRECTION_HORIZONTAL).map_err(failed)?;
    }
    if p.flip.vertical {
        img = img.flip(vips::DIRECTION_VERTICAL).map_err(failed)?;
    }
    img = match plan.crop {
        Crop::None | Crop::Smart { .. } => img,
        Crop::Area { at, size } => img.crop(at.0, at.1, size.0, size.1).map_err(failed)?,
    };
    if let (Some((at, size)), Fit::Pad) = (plan.pad, p.fit) {
        let transparent = p.bg.is_none() && job.format.has_alpha();
        if transparent && !img.has_alpha() {
            img = img.addalpha().map_err(failed)?;
        }
        let [r, g, b] = p.bg.unwrap_or([255, 255, 255]);
        let mut bg = vec![f64::from(r), f64::from(g), f64::from(b)];
        if img.has_alpha() {
            bg.push(if transparent { 0.0 } else { 255.0 });
        }
        img = img.embed(at, size, &bg).map_err(failed)?;
    }
    img = effects(img, p).map_err(failed)?;
    // Watermark images are read in place while the pipeline runs: kept
    // alive until it is saved.
    let mut keep_alive = Vec::new();
    for mark in &job.marks {
        img = draw(img, mark, sources, source_ttl, &mut keep_alive).map_err(failed)?;
    }
    if img.has_alpha() && !job.format.has_alpha() {
        let [r, g, b] = p.bg.unwrap_or([255, 255, 255]);
        img = img
            .flatten(&[f64::from(r), f64::from(g), f64::from(b)])
            .map_err(failed)?;
    }
    let (width, height) = (img.width(), img.height());
    let q = job.quality;
    let body = img
        .save(match job.format {
            Format::Jpeg => SaveAs::Jpeg { quality: q },
            Format::Png => SaveAs::Png,
            Format::Webp => SaveAs::Webp { quality: q },
            Format::Avif => SaveAs::Avif { quality: q },
        })
        .map_err(failed)?;
    drop(img);
    drop(keep_alive);
    Ok(Output {
        body,
        width,
        height,
    })
}

/// Blur, sharpen, brightness, contrast, saturation, grayscale.
fn effects(mut img: Image, p: &Params) -> Result<Image, String> {
    if p.blur > 0 {
        img = img.gaussblur(f64::from(p.blur) / 100.0)?;
    }
    if p.sharpen > 0 {
        img = img.sharpen(f64::from(p.sharpen) / 100.0)?;
    }
    if p.brightness != 0 || p.contrast != 0 {
        let a = 1.0 + f64::from(p.contrast) / 100.0;
        let b = 128.0 * (1.0 - a) + f64::from(p.brightness) * 2.55;
        img = per_colour_band(&img, a, b)?;
    }
    if p.saturation != 0 {
        let alpha = img.has_alpha();
        let lch = img.colourspace(vips::INTERPRETATION_LCH)?;
        let k = (1.0 + f64::from(p.saturation) / 100.0).max(0.0);
        let mut a = vec![1.0, k, 1.0];
        let mut b = vec![0.0, 0.0, 0.0];
        if alpha {
            a.push(1.0);
            b.push(0.0);
        }
        img = lch
            .linear_float(&a, &b)?
            .colourspace(vips::INTERPRETATION_SRGB)?;
        img = img.cast(vips::FORMAT_UCHAR)?;
    }
    if p.grayscale {
        img = img
            .colourspace(vips::INTERPRETATION_B_W)?
            .colourspace(vips::INTERPRETATION_SRGB)?;
    }
    Ok(img)
}

/// `a * v + b` on the colour bands, alpha untouched.
fn per_colour_band(img: &Image, a: f64, b: f64) -> Result<Image, String> {
    let bands = img.bands().max(1) as usize;
    let colour = if img.has_alpha() { bands - 1 } else { bands };
    let mut av = vec![a; colour];
    let mut bv = vec![b; colour];
    av.resize(bands, 1.0);
    bv.resize(bands, 0.0);
    img.linear(&av, &bv)
}

/// The mark as an sRGB image with alpha.
fn overlay(
    mark: &Drawn,
    sources: &Sources,
    ttl: Duration,
    keep_alive: &mut Vec<Arc<Vec<u8>>>,
) -> Result<Image, String> {
    let opacity = f64::from(mark.opacity.clamp(0.0, 1.0));
    let img = match &mark.kind {
        DrawnKind::Text {
            text,
            font_size,
            color,
        } => {
            let mask = vips::text(&markup_escape(text), &format!("sans {font_size}"))?;
            let rgb = mask
                .constant(&color.map(f64::from))?
                .copy_as(vips::INTERPRETATION_SRGB)?;
            let alpha = mask.linear(&[opacity], &[0.0])?;
            rgb.bandjoin(&alpha)?
        }
        DrawnKind::Image {
            source,
            width,
            height,
        } => {
            let bytes = sources.get(source, ttl)?;
            let head = vips::header(&bytes)?;
            let (sw, sh) = (head.width.max(1), head.height.max(1));
            let ratio = |n: u32, a: u32, b: u32| {
                ((u64::from(n) * u64::from(a) + u64::from(b) / 2) / u64::from(b)).max(1) as u32
            };
            let (w, h) = match (width, height) {
                (Some(w), Some(h)) => (*w, *h),
                (Some(w), None) => (*w, ratio(sh, *w, sw)),
                (None, Some(h)) => (ratio(sw, *h, sh), *h),
                (None, None) => (sw, sh),
            };
            let size = (w.clamp(1, 4096), h.clamp(1, 4096));
            let mut img = vips::thumbnail(&bytes, size, Thumb::Exact, false)?
                .colourspace(vips::INTERPRETATION_SRGB)?;
            keep_alive.push(bytes);
            if !img.has_alpha() {
                img = img.addalpha()?;
            }
            img.linear(&[1.0, 1.0, 1.0, opacity], &[0.0; 4])?
        }
    };
    if mark.rotation % 360 != 0 {
        return img.rotate(f64::from(mark.rotation));
    }
    Ok(img)
}

/// Draws one mark onto `img` where its position says.
fn draw(
    img: Image,
    mark: &Drawn,
    sources: &Sources,
    ttl: Duration,
    keep_alive: &mut Vec<Arc<Vec<u8>>>,
) -> Result<Image, String> {
    let mut over = overlay(mark, sources, ttl, keep_alive)?;
    let (w, h) = (img.width() as i64, img.height() as i64);
    let margin = i64::from(mark.margin);
    match mark.position {
        Position::Grid(col, row) => {
            let (ow, oh) = (over.width() as i64, over.height() as i64);
            let place = |slot: u8, room: i64, size: i64| match slot {
                0 => margin,
                1 => (room - size) / 2,
                _ => room - size - margin,
            };
            let x = place(col, w, ow);
            let y = place(row, h, oh);
            img.composite(&over, x as i32, y as i32)
        }
        Position::Tiled => {
            let gap = mark.tile_spacing;
            let (tw, th) = (over.width() + gap, over.height() + gap);
            let tile = over.embed((0, 0), (tw, th), &[0.0, 0.0, 0.0, 0.0])?;
            let across = (w as u32).div_ceil(tw).max(1);
            let down = (h as u32).div_ceil(th).max(1);
            let sheet = tile
                .replicate(across, down)?
                .crop(0, 0, w as u32, h as u32)?;
            img.composite(&sheet, 0, 0)
        }
        Position::DiagonalBand => {
            if mark.rotation % 360 == 0 {
                let angle = -(h as f64).atan2(w as f64).to_degrees();
                over = over.rotate(angle)?;
            }
            let (ow, oh) = (over.width() as i64, over.height() as i64);
            let step = ow.max(oh).max(1) + i64::from(mark.tile_spacing) / 4;
            let diagonal = ((w * w + h * h) as f64).sqrt() as i64;
            let count = (diagonal / step).clamp(1, 64);
            let mut out = img;
            for i in 0..count {
                let cx = (2 * i + 1) * w / (2 * count);
                let cy = (2 * i + 1) * h / (2 * count);
                out = out.composite(&over, (cx - ow / 2) as i32, (cy - oh / 2) as i32)?;
            }
            Ok(out)
        }
    }
}

/// Text for Pango (libvips renders markup): `&`, `<`, `>` as entities.
fn markup_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG header claiming `w` x `h`, with no pixel data after it.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn a_bomb_is_refused_from_its_header() {
        let e = inspect(&png_header(50_000, 50_000), 40_000_000).expect_err("bomb");
        assert!(
            matches!(&e, Failure::TooLarge(m) if m.contains("50000x50000")),
            "{e:?}"
        );
        let ok = inspect(&png_header(100, 50), 40_000_000).expect("small");
        assert_eq!((ok.format, ok.width, ok.height), (Format::Png, 100, 50));
        assert!(matches!(
            inspect(b"%PDF-1.7 not an image", 1000),
            Err(Failure::Unsupported(_))
        ));
    }

    #[test]
    fn markup_is_escaped() {
        assert_eq!(markup_escape("a<b>&c"), "a&lt;b&gt;&amp;c");
    }
}
