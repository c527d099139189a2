//! Watermarks (`buckets[].watermark`, the other system's keys): rules
//! matched against the request path (first match wins), text templates
//! rendered per request (`{{jwt.<claim>}}`, `{{ip}}`, `{{date}}`, ...), and
//! the rendered marks that key a variant: viewers whose text differs never
//! share a copy. Pure but for [`Context::now`]; drawing is `transform`'s.

// Fields mirror the `watermark` keys of the same names (docs/images.md).
#![allow(missing_docs)]

use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::time::Duration;

/// `buckets[].watermark`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Watermarks {
    /// How long a fetched image watermark is kept.
    pub cache_ttl: Duration,
    pub rules: Vec<Rule>,
}

/// `rules[]`: a glob over the request path and its marks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub pattern: String,
    pub marks: Vec<Mark>,
}

/// One `watermarks[]` entry: as configured (`Mark<Template>`), or as
/// drawn for one request (`Drawn`, its text rendered).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark<T = Template> {
    pub kind: MarkKind<T>,
    /// 0 to 1.
    pub opacity: f32,
    pub position: Position,
    /// Pixels from the edges (grid positions).
    pub margin: u32,
    /// Degrees, clockwise.
    pub rotation: i32,
    /// Pixels between tiles (`tiled`).
    pub tile_spacing: u32,
}

/// Text or an image.
#[derive(Debug, Clone, PartialEq)]
pub enum MarkKind<T = Template> {
    Text {
        text: T,
        font_size: u32,
        color: [u8; 3],
    },
    Image {
        /// `https://`/`http://` URL, or a file path.
        source: String,
        width: Option<u32>,
        height: Option<u32>,
    },
}

/// Where a mark goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Column and row of the 3x3 grid: 0 start, 1 middle, 2 end.
    Grid(u8, u8),
    /// Repeated over the whole image.
    Tiled,
    /// Repeated along the diagonal, top left to bottom right.
    DiagonalBand,
}

impl Position {
    /// The other system's names.
    pub fn parse(s: &str) -> Option<Position> {
        Some(match s {
            "top-left" => Position::Grid(0, 0),
            "top-center" => Position::Grid(1, 0),
            "top-right" => Position::Grid(2, 0),
            "center-left" => Position::Grid(0, 1),
            "center" => Position::Grid(1, 1),
            "center-right" => Position::Grid(2, 1),
            "bottom-left" => Position::Grid(0, 2),
            "bottom-center" => Position::Grid(1, 2),
            "bottom-right" => Position::Grid(2, 2),
            "tiled" => Position::Tiled,
            "diagonal-band" => Position::DiagonalBand,
            _ => return None,
        })
    }
}

/// A text with `{{...}}` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A claim by its dotted path.
    Jwt(Vec<String>),
    Ip,
    Date,
    DateTime,
    Timestamp,
    Path,
    Bucket,
    Header(String),
}

impl Template {
    /// Parses `text`; `Err` names a value it does not know.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("{{{{ without }}}} in {text:?}"))?;
            let name = after[..close].trim();
            parts.push(match name {
                "ip" => Part::Ip,
                "date" => Part::Date,
                "datetime" => Part::DateTime,
                "timestamp" => Part::Timestamp,
                "path" => Part::Path,
                "bucket" => Part::Bucket,
                _ => {
                    if let Some(claim) = name.strip_prefix("jwt.").filter(|c| !c.is_empty()) {
                        Part::Jwt(claim.split('.').map(str::to_string).collect())
                    } else if let Some(h) = name.strip_prefix("header.").filter(|h| !h.is_empty()) {
                        Part::Header(h.to_ascii_lowercase())
                    } else {
                        return Err(format!(
                            "{{{{{name}}}}} is not a template value (jwt.<claim>, ip, header.<name>, path, bucket, date, datetime, timestamp)"
                        ));
                    }
                }
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// Whether it names a JWT claim (its bucket must authenticate).
    pub fn uses_jwt(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Part::Jwt(_)))
    }

    /// The text for one request.
    pub fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::new();
        let secs = ctx
            .now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Jwt(path) => {
                    let mut v = ctx.claims;
                    for seg in path {
                        v = v.and_then(|v| v.get(seg));
                    }
                    match v {
                        Some(serde_json::Value::String(s)) => out.push_str(s),
                        Some(serde_json::Value::Null) | None => {}
                        Some(other) => out.push_str(&other.to_string()),
                    }
                }
                Part::Ip => out.push_str(&ctx.ip.to_string()),
                Part::Date => {
                    let (y, m, d, ..) = crate::clock::civil(secs);
                    out.push_str(&format!("{y:04}-{m:02}-{d:02}"));
                }
                Part::DateTime => {
                    let (y, m, d, h, mi, s) = crate::clock::civil(secs);
                    out.push_str(&format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"));
                }
                Part::Timestamp => out.push_str(&secs.to_string()),
                Part::Path => out.push_str(ctx.path),
                Part::Bucket => out.push_str(ctx.bucket),
                Part::Header(name) => {
                    if let Some(v) = (ctx.header)(name) {
                        out.push_str(&v);
                    }
                }
            }
        }
        // One line, printable: a header or claim cannot smuggle layout.
        out.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(512)
            .collect()
    }
}

/// What a template may read of one request.
pub struct Context<'a> {
    pub claims: Option<&'a serde_json::Value>,
    pub ip: IpAddr,
    pub path: &'a str,
    pub bucket: &'a str,
    pub now: std::time::SystemTime,
    pub header: &'a dyn Fn(&str) -> Option<String>,
}

/// A mark as drawn for one request: its text rendered.
pub type Drawn = Mark<String>;

/// What a drawn mark shows.
pub type DrawnKind = MarkKind<String>;

impl Mark {
    /// This mark with its text rendered for one request.
    fn drawn(&self, ctx: &Context<'_>) -> Drawn {
        Mark {
            kind: match &self.kind {
                MarkKind::Text {
                    text,
                    font_size,
                    color,
                } => MarkKind::Text {
                    text: text.render(ctx),
                    font_size: *font_size,
                    color: *color,
                },
                MarkKind::Image {
                    source,
                    width,
                    height,
                } => MarkKind::Image {
                    source: source.clone(),
                    width: *width,
                    height: *height,
                },
            },
            opacity: self.opacity,
            position: self.position,
            margin: self.margin,
            rotation: self.rotation,
            tile_spacing: self.tile_spacing,
        }
    }
}

impl Watermarks {
    /// The marks for `path` (the first rule that matches), rendered;
    /// `None` when no rule matches.
    pub fn render(&self, ctx: &Context<'_>) -> Option<Vec<Drawn>> {
        let rule = self.rules.iter().find(|r| glob(&r.pattern, ctx.path))?;
        Some(rule.marks.iter().map(|m| m.drawn(ctx)).collect())
    }
}

/// A short digest of rendered marks, part of the variant's cache key.
pub fn fingerprint(marks: &[Drawn]) -> String {
    let mut h = Sha256::new();
    for m in marks {
        h.update(format!("{m:?}\n").as_bytes());
    }
    hex::encode(&h.finalize()[..12])
}

/// Glob match over a path: `*` and `?` stay within one `/` segment, `**`
/// crosses them (`**/` also matches nothing); `*` alone matches all.
pub fn glob(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = &p[2..];
                // `**/` may match nothing at all.
                if rest.first() == Some(&b'/') && go(&rest[1..], s) {
                    return true;
                }
                (0..=s.len()).any(|i| go(rest, &s[i..]))
            }
            Some(b'*') => {
                let rest = &p[1..];
                for i in 0..=s.len() {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if s.get(i) == Some(&b'/') {
                        break;
                    }
                }
                false
            }
            Some(b'?') => s.first().is_some_and(|&c| c != b'/') && go(&p[1..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && go(&p[1..], &s[1..]),
        }
    }
    // A lone `*` matches every path, as the other system reads it (its
    // examples use it for "everything in the bucket").
    if pattern == "*" {
        return true;
    }
    // Matched against the path with and without its leading slash, so
    // `*.jpg` and `/img/*.jpg` both read as written.
    go(pattern.as_bytes(), path.as_bytes())
        || go(pattern.as_bytes(), path.trim_start_matches('/').as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx<'a>(claims: Option<&'a serde_json::Value>, path: &'a str) -> Context<'a> {
        Context {
            claims,
            ip: "192.0.2.7".parse().expect("ip"),
            path,
            bucket: "previews",
            // 2025-12-25T14:30:00Z
            now: std::time::UNIX_EPOCH + Duration::from_secs(1_766_673_000),
            header: &|name| (name == "x-name").then(|| "Ann".to_string()),
        }
    }

    #[test]
    fn templates_render_claims_ip_dates_and_headers() {
        let claims = json!({"sub": "ann@example.com", "org": {"name": "Acme"}, "n": 7});
        let t = Template::parse(
            "Licensed to {{jwt.sub}} ({{ jwt.org.name }}, {{jwt.n}}{{jwt.missing}}) from {{ip}} on {{date}} {{datetime}} {{timestamp}} {{header.X-Name}} {{bucket}}{{path}}",
        )
        .expect("template");
        assert!(t.uses_jwt());
        assert_eq!(
            t.render(&ctx(Some(&claims), "/preview/a.jpg")),
            "Licensed to ann@example.com (Acme, 7) from 192.0.2.7 on 2025-12-25 2025-12-25T14:30:00Z 1766673000 Ann previews/preview/a.jpg"
        );
        assert!(Template::parse("{{nope}}").is_err());
        assert!(Template::parse("{{ip").is_err());
        let ctl = Template::parse("{{jwt.sub}}").expect("t");
        let evil = json!({"sub": "a\nb\u{7}c"});
        assert_eq!(ctl.render(&ctx(Some(&evil), "/x")), "a b c");
    }

    #[test]
    fn globs_keep_single_stars_within_a_segment() {
        assert!(glob("**/*.jpg", "/preview/a.jpg"));
        assert!(glob("**/*.jpg", "/preview/deep/er/a.jpg"));
        assert!(!glob("**/*.jpg", "/preview/a.png"));
        assert!(glob("**", "/anything/at/all"));
        assert!(glob("**/previews/*.jpg", "/img/previews/a.jpg"));
        assert!(!glob("**/previews/*.jpg", "/img/previews/x/a.jpg"));
        assert!(glob("/docs/*", "/docs/a.pdf"));
        assert!(!glob("/docs/*", "/docs/a/b.pdf"));
        assert!(glob("*", "a.jpg"));
        assert!(glob("*", "/docs/deep/a.jpg"), "a lone star is everything");
        assert!(!glob("*.jpg", "/docs/a.jpg"));
        assert!(glob("a?c.jpg", "/abc.jpg"));
    }

    #[test]
    fn first_matching_rule_wins_and_rendered_text_keys_the_variant() {
        let text = |s: &str| Mark {
            kind: MarkKind::Text {
                text: Template::parse(s).expect("t"),
                font_size: 24,
                color: [255, 0, 0],
            },
            opacity: 0.5,
            position: Position::Grid(2, 2),
            margin: 10,
            rotation: 0,
            tile_spacing: 100,
        };
        let w = Watermarks {
            cache_ttl: Duration::from_secs(60),
            rules: vec![
                Rule {
                    pattern: "**/*.jpg".into(),
                    marks: vec![text("for {{jwt.sub}}")],
                },
                Rule {
                    pattern: "**".into(),
                    marks: vec![text("other")],
                },
            ],
        };
        let ann = json!({"sub": "ann"});
        let bob = json!({"sub": "bob"});
        let a = w.render(&ctx(Some(&ann), "/p/x.jpg")).expect("rule");
        let b = w.render(&ctx(Some(&bob), "/p/x.jpg")).expect("rule");
        assert_eq!(
            a[0].kind,
            DrawnKind::Text {
                text: "for ann".into(),
                font_size: 24,
                color: [255, 0, 0]
            }
        );
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(
            fingerprint(&a),
            fingerprint(&w.render(&ctx(Some(&ann), "/p/y.jpg")).expect("r"))
        );
        let png = w.render(&ctx(None, "/p/x.png")).expect("fallback rule");
        assert!(matches!(&png[0].kind, DrawnKind::Text { text, .. } if text == "other"));
        let none = Watermarks {
            cache_ttl: w.cache_ttl,
            rules: vec![w.rules[0].clone()],
        };
        assert!(none.render(&ctx(None, "/p/x.png")).is_none());
    }
}
