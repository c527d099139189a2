//! `image_optimization` (top level, and per bucket over it) and
//! `buckets[].watermark` -> [`ImageSettings`], [`Watermarks`] and the
//! process's [`ImagePool`]. libvips is loaded here when any bucket uses
//! images, so `--check` names a missing library.

use super::super::schema::{RawImages, RawMark, RawWatermark};
use super::super::ImagePool;
use super::Problems;
use crate::images::watermark::{Mark, MarkKind, Position, Rule, Template, Watermarks};
use crate::images::{plan::Limits, ImageSettings};
use std::time::Duration;

/// `max_width` / `max_height` default (the other system's).
const DEFAULT_MAX_SIDE: u32 = 4096;
/// `default_quality` default (the other system's).
const DEFAULT_QUALITY: u8 = 80;
/// `max_input_pixels` default: 40 megapixels (a 7300x5500 photo).
const DEFAULT_MAX_INPUT_PIXELS: u64 = 40_000_000;
/// `max_input_mb` default.
const DEFAULT_MAX_INPUT_MB: u64 = 32;
/// `max_queue` default.
const DEFAULT_QUEUE: usize = 64;
/// `watermark.cache_ttl_seconds` default (the other system's).
const DEFAULT_WATERMARK_TTL_SECS: u64 = 3600;
/// Largest output side accepted in the settings.
const MAX_SIDE: u32 = 16_384;

/// A bucket's image settings: `own` over `top`; `None` when neither
/// transforms nor a watermark applies to it.
pub(super) fn bucket_images(
    top: Option<&RawImages>,
    own: Option<&RawImages>,
    watermarked: bool,
    at: &str,
    p: &mut Problems,
) -> Option<ImageSettings> {
    if let Some(o) = own {
        for (set, key) in [
            (o.max_concurrent.is_some(), "max_concurrent"),
            (o.max_queue.is_some(), "max_queue"),
        ] {
            if set {
                p.at(
                    &format!("{at}.image_optimization.{key}"),
                    "is process-wide; set it under the top-level image_optimization",
                );
            }
        }
    }
    let pick = |f: fn(&RawImages) -> Option<u64>| own.and_then(f).or_else(|| top.and_then(f));
    let transforms = own
        .and_then(|o| o.enabled)
        .or_else(|| top.and_then(|t| t.enabled))
        .unwrap_or(false);
    if !transforms && !watermarked {
        return None;
    }
    // Where a key came from, for its problems.
    let key_at = |key: &str| {
        if own.is_some_and(|o| has(o, key)) {
            format!("{at}.image_optimization.{key}")
        } else {
            format!("image_optimization.{key}")
        }
    };
    let side = |v: Option<u64>, key: &str, p: &mut Problems| {
        let v = v.unwrap_or(u64::from(DEFAULT_MAX_SIDE));
        if v == 0 || v > u64::from(MAX_SIDE) {
            p.at(&key_at(key), format_args!("must be from 1 to {MAX_SIDE}"));
        }
        v.clamp(1, u64::from(MAX_SIDE)) as u32
    };
    let max_width = side(pick(|r| r.max_width.map(u64::from)), "max_width", p);
    let max_height = side(pick(|r| r.max_height.map(u64::from)), "max_height", p);
    let quality = pick(|r| r.default_quality.map(u64::from)).unwrap_or(u64::from(DEFAULT_QUALITY));
    if !(1..=100).contains(&quality) {
        p.at(&key_at("default_quality"), "must be from 1 to 100");
    }
    let max_input_pixels = pick(|r| r.max_input_pixels).unwrap_or(DEFAULT_MAX_INPUT_PIXELS);
    p.positive(&key_at("max_input_pixels"), max_input_pixels);
    let max_input_mb = pick(|r| r.max_input_mb).unwrap_or(DEFAULT_MAX_INPUT_MB);
    p.positive(&key_at("max_input_mb"), max_input_mb);
    let src = own
        .filter(|o| o.signing_key.is_some() || o.signing_key_file.is_some())
        .or(top);
    let signing_key = src.and_then(|s| signing_key(s, &key_at("signing_key"), p));
    let list = |f: fn(&RawImages) -> Option<&Vec<u32>>, key: &str, max: u32, p: &mut Problems| {
        let v = own
            .and_then(f)
            .or_else(|| top.and_then(f))
            .cloned()
            .unwrap_or_default();
        if v.iter().any(|&x| x == 0 || x > max) {
            p.at(
                &key_at(key),
                format_args!("holds a size outside 1 to {max}"),
            );
        }
        v
    };
    let allowed_widths = list(
        |r| r.allowed_widths.as_ref(),
        "allowed_widths",
        max_width,
        p,
    );
    let allowed_heights = list(
        |r| r.allowed_heights.as_ref(),
        "allowed_heights",
        max_height,
        p,
    );
    Some(ImageSettings {
        transforms,
        limits: Limits {
            max_width,
            max_height,
        },
        quality: quality.clamp(1, 100) as u8,
        max_input_pixels,
        max_input_bytes: max_input_mb.saturating_mul(1024 * 1024),
        signing_key,
        allowed_widths,
        allowed_heights,
    })
}

fn has(r: &RawImages, key: &str) -> bool {
    match key {
        "max_width" => r.max_width.is_some(),
        "max_height" => r.max_height.is_some(),
        "default_quality" => r.default_quality.is_some(),
        "max_input_pixels" => r.max_input_pixels.is_some(),
        "max_input_mb" => r.max_input_mb.is_some(),
        "signing_key" => r.signing_key.is_some() || r.signing_key_file.is_some(),
        "allowed_widths" => r.allowed_widths.is_some(),
        "allowed_heights" => r.allowed_heights.is_some(),
        _ => false,
    }
}

fn signing_key(r: &RawImages, at: &str, p: &mut Problems) -> Option<Vec<u8>> {
    let key = match (&r.signing_key, &r.signing_key_file) {
        (Some(_), Some(_)) => {
            p.at(at, "set signing_key or signing_key_file, not both");
            return None;
        }
        (Some(k), None) => k.trim().as_bytes().to_vec(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(k) => k.trim().as_bytes().to_vec(),
            Err(e) => {
                p.at(&format!("{at}_file"), format_args!("cannot read {f}: {e}"));
                return None;
            }
        },
        (None, None) => return None,
    };
    if key.len() < 16 {
        p.at(at, "must be at least 16 characters");
        return None;
    }
    Some(key)
}

/// The process's transform pool, once some bucket uses images: loads
/// libvips (a missing library is a problem at `image_optimization`).
pub(super) fn pool(top: Option<&RawImages>, used: bool, p: &mut Problems) -> Option<ImagePool> {
    let threads = top.and_then(|t| t.max_concurrent).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let queue = top.and_then(|t| t.max_queue).unwrap_or(DEFAULT_QUEUE);
    if threads == 0 || threads > 256 {
        p.at("image_optimization.max_concurrent", "must be from 1 to 256");
    }
    if queue == 0 || queue > 100_000 {
        p.at("image_optimization.max_queue", "must be from 1 to 100000");
    }
    if !used {
        return None;
    }
    if let Err(e) = crate::images::vips::load() {
        p.at("image_optimization", e);
        return None;
    }
    Some(ImagePool {
        threads: threads.clamp(1, 256),
        queue: queue.clamp(1, 100_000),
    })
}

/// `buckets[].watermark`, when enabled; `auth`: the bucket authenticates
/// (a `{{jwt.*}}` value renders empty otherwise: warned).
pub(super) fn watermark(
    raw: &RawWatermark,
    at: &str,
    auth: bool,
    p: &mut Problems,
) -> Option<Watermarks> {
    if raw.enabled != Some(true) {
        return None;
    }
    if raw.rules.is_empty() {
        p.at(
            &format!("{at}.rules"),
            "needs at least one rule when enabled",
        );
    }
    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let rat = format!("{at}.rules[{i}]");
        if r.pattern.trim().is_empty() {
            p.at(&format!("{rat}.pattern"), "must not be empty");
        }
        if r.watermarks.is_empty() {
            p.at(&format!("{rat}.watermarks"), "needs at least one watermark");
        }
        let marks = r
            .watermarks
            .iter()
            .enumerate()
            .filter_map(|(j, m)| mark(m, &format!("{rat}.watermarks[{j}]"), auth, p))
            .collect();
        rules.push(Rule {
            pattern: r.pattern.trim().to_string(),
            marks,
        });
    }
    Some(Watermarks {
        cache_ttl: Duration::from_secs(raw.cache_ttl_seconds.unwrap_or(DEFAULT_WATERMARK_TTL_SECS)),
        rules,
    })
}

fn mark(m: &RawMark, at: &str, auth: bool, p: &mut Problems) -> Option<Mark> {
    let opacity = m.opacity.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&opacity) {
        p.at(&format!("{at}.opacity"), "must be from 0.0 to 1.0");
    }
    let position = match m.position.as_deref().map(str::trim) {
        None => {
            p.at(&format!("{at}.position"), "is required");
            Position::Grid(2, 2)
        }
        Some(s) => Position::parse(s).unwrap_or_else(|| {
            p.at(
                &format!("{at}.position"),
                format_args!("{s:?} is not a position (top-left, top-center, top-right, center-left, center, center-right, bottom-left, bottom-center, bottom-right, tiled, diagonal-band)"),
            );
            Position::Grid(2, 2)
        }),
    };
    let not_for = |set: bool, key: &str, kind: &str, p: &mut Problems| {
        if set {
            p.at(
                &format!("{at}.{key}"),
                format_args!("does not apply to type: {kind}"),
            );
        }
    };
    let kind = match m.kind.trim() {
        "text" => {
            not_for(m.source.is_some(), "source", "text", p);
            not_for(m.width.is_some(), "width", "text", p);
            not_for(m.height.is_some(), "height", "text", p);
            let text = m.text.as_deref().unwrap_or("");
            if text.trim().is_empty() {
                p.at(&format!("{at}.text"), "is required for type: text");
            }
            let template = match Template::parse(text) {
                Ok(t) => t,
                Err(e) => {
                    p.at(&format!("{at}.text"), e);
                    return None;
                }
            };
            if template.uses_jwt() && !auth {
                p.warn(
                    &format!("{at}.text"),
                    "names a JWT claim, but the bucket does not authenticate (auth.enabled): the claim renders empty",
                );
            }
            let font_size = m.font_size.unwrap_or(24);
            if !(4..=512).contains(&font_size) {
                p.at(&format!("{at}.font_size"), "must be from 4 to 512");
            }
            let color = match m.color.as_deref() {
                None => [255, 255, 255],
                Some(c) => crate::images::params::colour("color", c.trim()).unwrap_or_else(|_| {
                    p.at(
                        &format!("{at}.color"),
                        "must be a colour as #RRGGBB or #RGB",
                    );
                    [255, 255, 255]
                }),
            };
            MarkKind::Text {
                text: template,
                font_size,
                color,
            }
        }
        "image" => {
            not_for(m.text.is_some(), "text", "image", p);
            not_for(m.font_size.is_some(), "font_size", "image", p);
            not_for(m.color.is_some(), "color", "image", p);
            let source = m.source.clone().unwrap_or_default();
            if source.trim().is_empty() {
                p.at(
                    &format!("{at}.source"),
                    "is required for type: image (a URL or a file path)",
                );
            }
            for (v, key) in [(m.width, "width"), (m.height, "height")] {
                if v.is_some_and(|v| v == 0 || v > 4096) {
                    p.at(&format!("{at}.{key}"), "must be from 1 to 4096");
                }
            }
            MarkKind::Image {
                source: source.trim().to_string(),
                width: m.width,
                height: m.height,
            }
        }
        other => {
            p.at(
                &format!("{at}.type"),
                format_args!("{other:?} is not a watermark type (text or image)"),
            );
            return None;
        }
    };
    let tile_spacing = m.tile_spacing.unwrap_or(100);
    if tile_spacing > 4096 {
        p.at(&format!("{at}.tile_spacing"), "must be at most 4096");
    }
    Some(Mark {
        kind,
        opacity: opacity.clamp(0.0, 1.0),
        position,
        margin: m.margin.unwrap_or(10).min(4096),
        rotation: m.rotation.unwrap_or(0).clamp(-360, 360),
        tile_spacing: tile_spacing.min(4096),
    })
}
