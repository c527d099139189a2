//! The image parameters of a request's query, checked and normalized
//! (pure: no I/O). `w`, `h` (pixels, or `50p` / `50%` of the original),
//! `dpr` (1-4), `fit`, `g`, `fmt` (`f`), `q`, `rot` (`r`), `flip`,
//! `auto_rotate`, `blur`, `sharpen`, `brightness`, `contrast`,
//! `saturation`, `grayscale`, `bg`; `sig` and `exp` sign a URL.
//!
//! Other parameters are not image parameters and are left alone (the
//! router decides what goes upstream). [`Params::canonical`] writes the
//! parameters in one order with defaults left out, so
//! `?w=400&fmt=webp` and `?fmt=webp&w=400&fit=contain` name one variant.

// Variants and fields are the parameters and values of the same names,
// documented in docs/images.md.
#![allow(missing_docs)]

use std::fmt::Write as _;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Avif,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
            Format::Avif => "avif",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Avif => "image/avif",
        }
    }

    /// Whether it can hold transparency.
    pub fn has_alpha(self) -> bool {
        !matches!(self, Format::Jpeg)
    }
}

/// `fmt`: a format, or `auto` (chosen from the client's `Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatChoice {
    Fixed(Format),
    Auto,
}

/// `fit`: how the image meets a `w` x `h` box (both given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Within the box, aspect kept (the default).
    #[default]
    Contain,
    /// Fills the box, aspect kept, the overflow cropped at the gravity.
    Cover,
    /// Exactly the box, aspect ignored.
    Fill,
    /// Within the box, aspect kept, never enlarged.
    Inside,
    /// Covers the box, aspect kept, nothing cropped.
    Outside,
    /// Within the box, then padded to it with `bg`.
    Pad,
}

/// `g`: where a crop (or a pad) keeps the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gravity {
    #[default]
    Center,
    North,
    South,
    East,
    West,
    NorthEast,
    NorthWest,
    SouthEast,
    SouthWest,
    /// What draws the eye (libvips' attention crop).
    Smart,
}

impl Gravity {
    /// Where along each axis the image is anchored: 0 start, 1 middle,
    /// 2 end (`Smart`: the middle, for a pad).
    pub fn anchor(self) -> (u8, u8) {
        match self {
            Gravity::Center | Gravity::Smart => (1, 1),
            Gravity::North => (1, 0),
            Gravity::South => (1, 2),
            Gravity::East => (2, 1),
            Gravity::West => (0, 1),
            Gravity::NorthEast => (2, 0),
            Gravity::NorthWest => (0, 0),
            Gravity::SouthEast => (2, 2),
            Gravity::SouthWest => (0, 2),
        }
    }
}

/// A width or height asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Px(u32),
    /// Percent of the original's.
    Pct(u32),
}

/// `flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flip {
    pub horizontal: bool,
    pub vertical: bool,
}

/// The parameters of one transform. Effects are kept in hundredths, so
/// that equal requests compare (and key) equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub w: Option<Dim>,
    pub h: Option<Dim>,
    /// Device pixel ratio, in hundredths (100-400).
    pub dpr: u32,
    pub fit: Fit,
    pub gravity: Gravity,
    pub format: Option<FormatChoice>,
    pub quality: Option<u8>,
    /// Clockwise: 0, 90, 180 or 270.
    pub rotate: u32,
    pub flip: Flip,
    pub auto_rotate: bool,
    /// Gaussian blur sigma, hundredths (0: none).
    pub blur: u32,
    /// Sharpen sigma, hundredths (0: none).
    pub sharpen: u32,
    /// -100 to 100 each (0: unchanged).
    pub brightness: i32,
    pub contrast: i32,
    pub saturation: i32,
    pub grayscale: bool,
    /// Pad colour (RGB); `None`: white, or transparent where the output
    /// holds alpha.
    pub bg: Option<[u8; 3]>,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            w: None,
            h: None,
            dpr: 100,
            fit: Fit::Contain,
            gravity: Gravity::Center,
            format: None,
            quality: None,
            rotate: 0,
            flip: Flip::default(),
            auto_rotate: true,
            blur: 0,
            sharpen: 0,
            brightness: 0,
            contrast: 0,
            saturation: 0,
            grayscale: false,
            bg: None,
        }
    }
}

/// A URL signature's parts: `sig` (hex HMAC-SHA256) and `exp` (Unix
/// seconds), when given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature {
    pub sig: Option<String>,
    pub exp: Option<u64>,
}

/// A parameter that is not acceptable: answered 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub name: &'static str,
    pub why: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "image parameter '{}' {}", self.name, self.why)
    }
}

/// Every parameter name read here, canonical name first for aliases.
const NAMES: &[(&str, &str)] = &[
    ("w", "w"),
    ("h", "h"),
    ("dpr", "dpr"),
    ("fit", "fit"),
    ("g", "g"),
    ("fmt", "fmt"),
    ("f", "fmt"),
    ("q", "q"),
    ("rot", "rot"),
    ("r", "rot"),
    ("flip", "flip"),
    ("auto_rotate", "auto_rotate"),
    ("blur", "blur"),
    ("sharpen", "sharpen"),
    ("brightness", "brightness"),
    ("contrast", "contrast"),
    ("saturation", "saturation"),
    ("grayscale", "grayscale"),
    ("bg", "bg"),
    ("sig", "sig"),
    ("exp", "exp"),
];

/// Reads the image parameters of `query` (the part after `?`, raw).
/// `Ok(None)`: no image parameter (a signature alone is none).
pub fn parse(query: &[u8]) -> Result<Option<(Params, Signature)>, ParamError> {
    let mut p = Params::default();
    let mut s = Signature::default();
    // Each canonical name's bit (its first place in NAMES), once seen.
    let mut seen = 0u64;
    let mut image_params = false;
    for pair in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(name);
        let Some(&(_, canon)) = NAMES.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let bit = 1u64 << NAMES.iter().position(|(n, _)| *n == canon).unwrap_or(63);
        if seen & bit != 0 {
            return Err(bad(canon, "is given twice"));
        }
        seen |= bit;
        image_params |= canon != "sig" && canon != "exp";
        let v = decode(value);
        let v = v.trim();
        match canon {
            "w" => p.w = Some(dim("w", v)?),
            "h" => p.h = Some(dim("h", v)?),
            "dpr" => p.dpr = hundredths("dpr", v, 100, 400, "a number from 1 to 4")?,
            "fit" => p.fit = fit(v)?,
            "g" => p.gravity = gravity(v)?,
            "fmt" => p.format = Some(format(v)?),
            "q" => p.quality = Some(whole("q", v, 1, 100)? as u8),
            "rot" => {
                p.rotate = match v {
                    "0" | "360" => 0,
                    "90" => 90,
                    "180" => 180,
                    "270" => 270,
                    _ => return Err(bad("rot", "must be 0, 90, 180 or 270")),
                }
            }
            "flip" => {
                p.flip = match v {
                    "h" => Flip {
                        horizontal: true,
                        vertical: false,
                    },
                    "v" => Flip {
                        horizontal: false,
                        vertical: true,
                    },
                    "hv" | "vh" | "both" => Flip {
                        horizontal: true,
                        vertical: true,
                    },
                    _ => return Err(bad("flip", "must be h, v or hv")),
                }
            }
            "auto_rotate" => p.auto_rotate = boolean("auto_rotate", v)?,
            "blur" => p.blur = hundredths("blur", v, 0, 10_000, "a number from 0 to 100")?,
            "sharpen" => p.sharpen = hundredths("sharpen", v, 0, 1_000, "a number from 0 to 10")?,
            "brightness" => p.brightness = signed("brightness", v)?,
            "contrast" => p.contrast = signed("contrast", v)?,
            "saturation" => p.saturation = signed("saturation", v)?,
            "grayscale" => p.grayscale = boolean("grayscale", v)?,
            "bg" => p.bg = Some(colour("bg", v)?),
            "sig" => {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("sig", "must be hexadecimal"));
                }
                s.sig = Some(v.to_ascii_lowercase());
            }
            "exp" => s.exp = Some(whole("exp", v, 0, u64::MAX)?),
            _ => {}
        }
    }
    if !image_params {
        return Ok(None);
    }
    Ok(Some((p, s)))
}

impl Params {
    /// The parameters in one order, defaults left out.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        self.write_canonical(&mut out);
        out
    }

    /// [`Self::canonical`], appended to `out`.
    pub fn write_canonical(&self, out: &mut String) {
        let mut first = true;
        let mut put = |name: &str, value: &dyn std::fmt::Display| {
            if !first {
                out.push('&');
            }
            first = false;
            let _ = write!(out, "{name}={value}");
        };
        if let Some(w) = self.w {
            put("w", &DimText(w));
        }
        if let Some(h) = self.h {
            put("h", &DimText(h));
        }
        if self.dpr != 100 {
            put("dpr", &Hundredths(self.dpr));
        }
        if self.fit != Fit::Contain {
            put("fit", &format_args!("{:?}", self.fit));
        }
        if self.gravity != Gravity::Center {
            put("g", &format_args!("{:?}", self.gravity));
        }
        match self.format {
            Some(FormatChoice::Fixed(f)) => put("fmt", &f.name()),
            Some(FormatChoice::Auto) => put("fmt", &"auto"),
            None => {}
        }
        if let Some(q) = self.quality {
            put("q", &q);
        }
        if self.rotate != 0 {
            put("rot", &self.rotate);
        }
        if self.flip != Flip::default() {
            put(
                "flip",
                &format_args!(
                    "{}{}",
                    if self.flip.horizontal { "h" } else { "" },
                    if self.flip.vertical { "v" } else { "" }
                ),
            );
        }
        if !self.auto_rotate {
            put("auto_rotate", &0);
        }
        if self.blur != 0 {
            put("blur", &Hundredths(self.blur));
        }
        if self.sharpen != 0 {
            put("sharpen", &Hundredths(self.sharpen));
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if v != 0 {
                put(name, &v);
            }
        }
        if self.grayscale {
            put("grayscale", &1);
        }
        if let Some([r, g, b]) = self.bg {
            put("bg", &format_args!("{r:02x}{g:02x}{b:02x}"));
        }
    }

    /// The widths and heights in pixels asked for (after `dpr`), where
    /// they do not depend on the original (percentages do).
    pub fn pixels_asked(&self) -> (Option<u32>, Option<u32>) {
        let px = |d: Option<Dim>| match d {
            Some(Dim::Px(v)) => Some(scale_dpr(v, self.dpr)),
            _ => None,
        };
        (px(self.w), px(self.h))
    }
}

/// `v` times a device pixel ratio in hundredths, rounded.
pub fn scale_dpr(v: u32, dpr: u32) -> u32 {
    ((u64::from(v) * u64::from(dpr) + 50) / 100).min(u64::from(u32::MAX)) as u32
}

/// The format `fmt=auto` chooses for `accept`: WebP where accepted (it
/// encodes at a fraction of AVIF's CPU), else AVIF; `None`: neither (the
/// caller falls back to JPEG, or PNG for an original with transparency).
pub fn negotiate(accept: &str) -> Option<Format> {
    let takes = |t: &str| {
        accept.split(',').any(|part| {
            let mut it = part.split(';');
            let media = it.next().unwrap_or("").trim();
            let q_zero = it.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            media.eq_ignore_ascii_case(t) && !q_zero
        })
    };
    if takes("image/webp") {
        Some(Format::Webp)
    } else if takes("image/avif") {
        Some(Format::Avif)
    } else {
        None
    }
}

struct DimText(Dim);

impl std::fmt::Display for DimText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Dim::Px(v) => write!(f, "{v}"),
            Dim::Pct(v) => write!(f, "{v}p"),
        }
    }
}

struct Hundredths(u32);

impl std::fmt::Display for Hundredths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        match frac {
            0 => write!(f, "{whole}"),
            f2 if f2 % 10 == 0 => write!(f, "{whole}.{}", f2 / 10),
            f2 => write!(f, "{whole}.{f2:02}"),
        }
    }
}

/// A query component, `+` as a space and percent-decoded (borrowed when
/// there is nothing to decode, as for nearly every image parameter).
fn decode(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        return String::from_utf8_lossy(raw);
    }
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    std::borrow::Cow::Owned(
        percent_encoding::percent_decode(&plus_as_space)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

fn bad(name: &'static str, why: impl Into<String>) -> ParamError {
    ParamError {
        name,
        why: why.into(),
    }
}

fn whole(name: &'static str, v: &str, min: u64, max: u64) -> Result<u64, ParamError> {
    v.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| bad(name, format!("must be a whole number from {min} to {max}")))
}

fn signed(name: &'static str, v: &str) -> Result<i32, ParamError> {
    v.parse::<i32>()
        .ok()
        .filter(|n| (-100..=100).contains(n))
        .ok_or_else(|| bad(name, "must be a whole number from -100 to 100"))
}

/// A decimal number with at most two places, in hundredths.
fn hundredths(
    name: &'static str,
    v: &str,
    min: u32,
    max: u32,
    what: &str,
) -> Result<u32, ParamError> {
    let err = || bad(name, format!("must be {what}"));
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || int.len() > 6
    {
        return Err(err());
    }
    let int: u32 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err())?
    };
    let frac = frac.trim_end_matches('0');
    if frac.len() > 2 {
        return Err(bad(
            name,
            format!("must be {what}, with at most two decimals"),
        ));
    }
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| err())?;
    let v = int * 100 + frac;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(err())
    }
}

fn dim(name: &'static str, v: &str) -> Result<Dim, ParamError> {
    if let Some(pct) = v.strip_suffix('p').or_else(|| v.strip_suffix('%')) {
        return whole(name, pct, 1, 1000)
            .map(|n| Dim::Pct(n as u32))
            .map_err(|_| {
                bad(
                    name,
                    "must be pixels (1 or more) or a percentage (1p to 1000p)",
                )
            });
    }
    whole(name, v, 1, 100_000)
        .map(|n| Dim::Px(n as u32))
        .map_err(|_| {
            bad(
                name,
                "must be pixels (1 or more) or a percentage (1p to 1000p)",
            )
        })
}

fn boolean(name: &'static str, v: &str) -> Result<bool, ParamError> {
    match v {
        "1" | "true" | "" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(bad(name, "must be 1 or 0")),
    }
}

fn fit(v: &str) -> Result<Fit, ParamError> {
    Ok(match v {
        "contain" => Fit::Contain,
        "cover" => Fit::Cover,
        "fill" => Fit::Fill,
        "inside" => Fit::Inside,
        "outside" => Fit::Outside,
        "pad" => Fit::Pad,
        _ => {
            return Err(bad(
                "fit",
                "must be contain, cover, fill, inside, outside or pad",
            ))
        }
    })
}

fn gravity(v: &str) -> Result<Gravity, ParamError> {
    Ok(match v {
        "center" | "centre" | "c" => Gravity::Center,
        "north" | "n" => Gravity::North,
        "south" | "s" => Gravity::South,
        "east" | "e" => Gravity::East,
        "west" | "w" => Gravity::West,
        "northeast" | "ne" => Gravity::NorthEast,
        "northwest" | "nw" => Gravity::NorthWest,
        "southeast" | "se" => Gravity::SouthEast,
        "southwest" | "sw" => Gravity::SouthWest,
        "smart" | "sm" => Gravity::Smart,
        _ => return Err(bad("g", "must be center, north, south, east, west, northeast, northwest, southeast, southwest or smart")),
    })
}

fn format(v: &str) -> Result<FormatChoice, ParamError> {
    Ok(match v {
        "jpeg" | "jpg" => FormatChoice::Fixed(Format::Jpeg),
        "png" => FormatChoice::Fixed(Format::Png),
        "webp" => FormatChoice::Fixed(Format::Webp),
        "avif" => FormatChoice::Fixed(Format::Avif),
        "auto" => FormatChoice::Auto,
        _ => return Err(bad("fmt", "must be jpeg, png, webp, avif or auto")),
    })
}

/// `rrggbb` or `rgb` (a leading `#` allowed); `white`, `black`.
pub fn colour(name: &'static str, v: &str) -> Result<[u8; 3], ParamError> {
    let err = || bad(name, "must be a colour as rrggbb or rgb (hexadecimal)");
    let hex = v.strip_prefix('#').unwrap_or(v);
    match hex {
        "white" => return Ok([255, 255, 255]),
        "black" => return Ok([0, 0, 0]),
        _ => {}
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = hex.as_bytes();
    match b.len() {
        3 => {
            let mut out = [0u8; 3];
            for (o, &c) in out.iter_mut().zip(b) {
                let n = nibble(c).ok_or_else(err)?;
                *o = n * 17;
            }
            Ok(out)
        }
        6 => {
            let mut out = [0u8; 3];
            for (i, o) in out.iter_mut().enumerate() {
                let hi = nibble(b[2 * i]).ok_or_else(err)?;
                let lo = nibble(b[2 * i + 1]).ok_or_else(err)?;
                *o = hi * 16 + lo;
            }
            Ok(out)
        }
        _ => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Params {
        parse(q.as_bytes()).expect("valid").expect("image params").0
    }

    #[test]
    fn order_aliases_and_defaults_do_not_change_the_variant() {
        let a = params("w=400&fmt=webp");
        let b = params("fmt=webp&w=400&fit=contain&g=c&dpr=1.0&auto_rotate=1");
        let c = params("f=webp&w=400");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.canonical(), "w=400&fmt=webp");
        let d = params("w=400&dpr=1.50&fit=cover&g=ne&rot=90&flip=hv&blur=0.5&q=70&bg=FFF");
        assert_eq!(
            d.canonical(),
            "w=400&dpr=1.5&fit=Cover&g=NorthEast&q=70&rot=90&flip=hv&blur=0.5&bg=ffffff"
        );
    }

    #[test]
    fn other_parameters_are_not_image_parameters() {
        assert_eq!(parse(b"versionId=3&x=1").expect("ok"), None);
        assert_eq!(parse(b"sig=ab&exp=5").expect("ok"), None);
        assert_eq!(parse(b"").expect("ok"), None);
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (q, name) in [
            ("w=0", "w"),
            ("w=abc", "w"),
            ("h=-3", "h"),
            ("dpr=5", "dpr"),
            ("dpr=1.234", "dpr"),
            ("fit=squash", "fit"),
            ("g=up", "g"),
            ("fmt=gif", "fmt"),
            ("q=0", "q"),
            ("q=101", "q"),
            ("rot=45", "rot"),
            ("flip=x", "flip"),
            ("brightness=101", "brightness"),
            ("blur=101", "blur"),
            ("bg=zzzzzz", "bg"),
            ("w=1&w=2", "w"),
            ("sig=xyz", "sig"),
        ] {
            let e = parse(q.as_bytes()).expect_err(q);
            assert_eq!(e.name, name, "{q}");
            assert!(e
                .to_string()
                .starts_with(&format!("image parameter '{name}'")));
        }
    }

    #[test]
    fn percentages_and_dpr_scale() {
        let p = params("w=50p&h=25%25");
        assert_eq!((p.w, p.h), (Some(Dim::Pct(50)), Some(Dim::Pct(25))));
        let p = params("w=400&h=300&dpr=2");
        assert_eq!(p.pixels_asked(), (Some(800), Some(600)));
        assert_eq!(scale_dpr(333, 150), 500);
    }

    #[test]
    fn auto_picks_from_accept() {
        let chrome = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8";
        assert_eq!(negotiate(chrome), Some(Format::Webp));
        assert_eq!(negotiate("image/avif,*/*"), Some(Format::Avif));
        assert_eq!(negotiate("image/webp;q=0, image/avif"), Some(Format::Avif));
        assert_eq!(negotiate("*/*"), None);
        assert_eq!(negotiate(""), None);
    }
}
