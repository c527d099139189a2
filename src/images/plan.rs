//! The geometry of one transform (pure): from the original's upright size
//! and the parameters, the size to scale to, the crop and the pad, within
//! the configured output limits.

// Fields are plain sizes and offsets in pixels: (width, height), (x, y).
#![allow(missing_docs)]

use super::params::{scale_dpr, Dim, Fit, Gravity, Params};

/// `image_optimization.max_width` / `max_height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
}

/// What is done to the (upright, rotated) original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The size it is scaled to.
    pub scale_to: (u32, u32),
    pub crop: Crop,
    /// A canvas it is placed on: (x, y) within (width, height).
    pub pad: Option<((u32, u32), (u32, u32))>,
}

impl Plan {
    /// The output's size.
    pub fn output(&self) -> (u32, u32) {
        match (self.pad, self.crop) {
            (Some((_, size)), _) => size,
            (None, Crop::Area { size, .. } | Crop::Smart { size }) => size,
            (None, Crop::None) => self.scale_to,
        }
    }
}

/// A crop after scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    None,
    Area {
        at: (u32, u32),
        size: (u32, u32),
    },
    /// Around what draws the eye.
    Smart {
        size: (u32, u32),
    },
}

/// Why no plan fits: answered 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError(pub String);

/// Plans the transform of an upright `src` (width, height; rotation by
/// `rot` already applied to it). Sizes asked for beyond the limits are
/// refused; an original larger than the limits with no size asked for is
/// scaled down to fit them.
pub fn plan(src: (u32, u32), p: &Params, limits: Limits) -> Result<Plan, PlanError> {
    let (sw, sh) = (src.0.max(1), src.1.max(1));
    let resolve = |d: Option<Dim>, of: u32| match d {
        None => None,
        Some(Dim::Px(v)) => Some(scale_dpr(v, p.dpr).max(1)),
        Some(Dim::Pct(pct)) => {
            let v = (u64::from(of) * u64::from(pct) + 50) / 100;
            Some(scale_dpr(v.min(u64::from(u32::MAX)) as u32, p.dpr).max(1))
        }
    };
    let w = resolve(p.w, sw);
    let h = resolve(p.h, sh);
    within(w, h, limits)?;
    let ratio = |num: u32, a: u32, b: u32| -> u32 {
        // num * a / b, rounded, at least 1.
        (((u64::from(num) * u64::from(a)) + u64::from(b) / 2) / u64::from(b)).max(1) as u32
    };
    let never_enlarge = p.fit == Fit::Inside;
    let plan = match (w, h) {
        (None, None) => {
            let fits = sw <= limits.max_width && sh <= limits.max_height;
            let size = if fits {
                (sw, sh)
            } else {
                fit_within((sw, sh), (limits.max_width, limits.max_height))
            };
            return Ok(Plan {
                scale_to: size,
                crop: Crop::None,
                pad: None,
            });
        }
        (Some(w), None) => {
            let w = if never_enlarge { w.min(sw) } else { w };
            simple((w, ratio(sh, w, sw)))
        }
        (None, Some(h)) => {
            let h = if never_enlarge { h.min(sh) } else { h };
            simple((ratio(sw, h, sh), h))
        }
        (Some(w), Some(h)) => match p.fit {
            Fit::Fill => simple((w, h)),
            Fit::Contain | Fit::Inside => {
                let mut size = fit_within((sw, sh), (w, h));
                if never_enlarge && (size.0 > sw || size.1 > sh) {
                    size = (sw, sh);
                }
                simple(size)
            }
            Fit::Outside => simple(cover_size((sw, sh), (w, h))),
            Fit::Cover => {
                let scaled = cover_size((sw, sh), (w, h));
                let crop = if p.gravity == Gravity::Smart {
                    Crop::Smart { size: (w, h) }
                } else {
                    let (ax, ay) = p.gravity.anchor();
                    let x = (scaled.0 - w) * u32::from(ax) / 2;
                    let y = (scaled.1 - h) * u32::from(ay) / 2;
                    Crop::Area {
                        at: (x, y),
                        size: (w, h),
                    }
                };
                Plan {
                    scale_to: scaled,
                    crop,
                    pad: None,
                }
            }
            Fit::Pad => {
                let size = fit_within((sw, sh), (w, h));
                let (ax, ay) = p.gravity.anchor();
                let x = (w - size.0) * u32::from(ax) / 2;
                let y = (h - size.1) * u32::from(ay) / 2;
                Plan {
                    scale_to: size,
                    crop: Crop::None,
                    pad: Some(((x, y), (w, h))),
                }
            }
        },
    };
    let (ow, oh) = plan.output();
    if ow > limits.max_width
        || oh > limits.max_height
        || plan.scale_to.0 > limits.max_width * 2
        || plan.scale_to.1 > limits.max_height * 2
    {
        return Err(PlanError(format!(
            "the output would be {ow}x{oh} pixels, above image_optimization.max_width x max_height ({}x{})",
            limits.max_width, limits.max_height
        )));
    }
    Ok(plan)
}

/// Checks a width and height asked for (pixels after `dpr`) against the
/// limits: the core checks what it can before fetching anything.
pub fn within(w: Option<u32>, h: Option<u32>, limits: Limits) -> Result<(), PlanError> {
    for (v, max, name, key) in [
        (w, limits.max_width, "w", "max_width"),
        (h, limits.max_height, "h", "max_height"),
    ] {
        if let Some(v) = v.filter(|v| *v > max) {
            return Err(PlanError(format!(
                "image parameter '{name}' asks for {v} pixels (after dpr), above image_optimization.{key} ({max})"
            )));
        }
    }
    Ok(())
}

fn simple(size: (u32, u32)) -> Plan {
    Plan {
        scale_to: size,
        crop: Crop::None,
        pad: None,
    }
}

/// The largest size of `src`'s aspect within `bound` (at least 1x1).
fn fit_within(src: (u32, u32), bound: (u32, u32)) -> (u32, u32) {
    let (sw, sh) = (u64::from(src.0), u64::from(src.1));
    let (bw, bh) = (u64::from(bound.0), u64::from(bound.1));
    // Scale by the tighter side: bw/sw against bh/sh.
    if bw * sh <= bh * sw {
        (bound.0, ((sh * bw + sw / 2) / sw).clamp(1, bh) as u32)
    } else {
        (((sw * bh + sh / 2) / sh).clamp(1, bw) as u32, bound.1)
    }
}

/// The smallest size of `src`'s aspect covering `bound`.
fn cover_size(src: (u32, u32), bound: (u32, u32)) -> (u32, u32) {
    let (sw, sh) = (u64::from(src.0), u64::from(src.1));
    let (bw, bh) = (u64::from(bound.0), u64::from(bound.1));
    if bw * sh >= bh * sw {
        (bound.0, ((sh * bw).div_ceil(sw)).max(bh) as u32)
    } else {
        (((sw * bh).div_ceil(sh)).max(bw) as u32, bound.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::params::parse;

    const LIMITS: Limits = Limits {
        max_width: 4096,
        max_height: 4096,
    };

    fn plan_for(src: (u32, u32), q: &str) -> Result<Plan, PlanError> {
        let p = parse(q.as_bytes()).expect("valid").expect("params").0;
        plan(src, &p, LIMITS)
    }

    #[test]
    fn one_side_keeps_the_aspect() {
        let p = plan_for((1920, 1080), "w=400").expect("plan");
        assert_eq!(p.output(), (400, 225));
        let p = plan_for((1920, 1080), "h=540").expect("plan");
        assert_eq!(p.output(), (960, 540));
        let p = plan_for((1920, 1080), "w=50p").expect("plan");
        assert_eq!(p.output(), (960, 540));
        let p = plan_for((1920, 1080), "w=400&dpr=2").expect("plan");
        assert_eq!(p.output(), (800, 450));
    }

    #[test]
    fn every_fit_meets_the_box_as_it_says() {
        let src = (1000, 500);
        let out = |fit: &str| {
            plan_for(src, &format!("w=300&h=300&fit={fit}"))
                .expect("plan")
                .output()
        };
        assert_eq!(out("contain"), (300, 150));
        assert_eq!(out("inside"), (300, 150));
        assert_eq!(out("fill"), (300, 300));
        assert_eq!(out("cover"), (300, 300));
        assert_eq!(out("outside"), (600, 300));
        assert_eq!(out("pad"), (300, 300));
        // Inside never enlarges; contain does.
        let small = (100, 50);
        let p = |fit: &str| plan_for(small, &format!("w=300&h=300&fit={fit}")).expect("plan");
        assert_eq!(p("inside").output(), (100, 50));
        assert_eq!(p("contain").output(), (300, 150));
    }

    #[test]
    fn gravity_places_the_crop_and_the_pad() {
        let src = (1000, 500);
        let crop = |g: &str| plan_for(src, &format!("w=300&h=300&fit=cover&g={g}")).expect("p");
        assert_eq!(
            crop("west").crop,
            Crop::Area {
                at: (0, 0),
                size: (300, 300)
            }
        );
        assert_eq!(
            crop("center").crop,
            Crop::Area {
                at: (150, 0),
                size: (300, 300)
            }
        );
        assert_eq!(
            crop("east").crop,
            Crop::Area {
                at: (300, 0),
                size: (300, 300)
            }
        );
        assert_eq!(crop("smart").crop, Crop::Smart { size: (300, 300) });
        let tall = (500, 1000);
        let c = |g: &str| {
            plan_for(tall, &format!("w=300&h=300&fit=cover&g={g}"))
                .expect("p")
                .crop
        };
        assert_eq!(
            c("north"),
            Crop::Area {
                at: (0, 0),
                size: (300, 300)
            }
        );
        assert_eq!(
            c("south"),
            Crop::Area {
                at: (0, 300),
                size: (300, 300)
            }
        );
        let pad = plan_for(src, "w=300&h=300&fit=pad&g=south").expect("p");
        assert_eq!(pad.scale_to, (300, 150));
        assert_eq!(pad.pad, Some(((0, 150), (300, 300))));
    }

    #[test]
    fn sizes_beyond_the_limits_are_refused_and_large_originals_fit_them() {
        let e = plan_for((8000, 6000), "w=5000").expect_err("too wide");
        assert!(e.0.contains("max_width"), "{}", e.0);
        let e = plan_for((8000, 6000), "w=3000&dpr=2").expect_err("too wide after dpr");
        assert!(e.0.contains("6000"), "{}", e.0);
        let p = plan_for((8000, 6000), "fmt=webp").expect("plan");
        assert_eq!(p.output(), (4096, 3072));
        let e = plan_for((100, 10), "w=4000&h=4000&fit=outside").expect_err("outside too big");
        assert!(e.0.contains("output"), "{}", e.0);
    }
}
