//! ListObjectsV2, the one S3 operation beyond GET and HEAD (for cache
//! pre-warming): the request target of one page, in SigV4's canonical query
//! form, and the page read back from S3's XML (parsed by `quick-xml`, whose
//! serde support reads S3's schema and unescapes entities: a hand-written
//! reader would have to get both right).

use serde::Deserialize;

/// One page of a listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The objects listed, in S3's (lexicographic) order.
    pub objects: Vec<Listed>,
    /// Folders below the prefix (only with a delimiter).
    pub prefixes: Vec<String>,
    /// The token for the next page; `None` on the last.
    pub next: Option<String>,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key, as stored (not encoded).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The target (`path?query`) of one ListObjectsV2 page on a replica:
/// `bucket_path` is `/<bucket>` (path style) or empty (virtual-hosted);
/// the query is sorted and encoded as SigV4 signs it.
pub fn target(
    bucket_path: &str,
    prefix: &str,
    delimited: bool,
    continuation: Option<&str>,
    max_keys: u32,
) -> String {
    let enc = |v: &str| {
        let mut s = String::new();
        crate::router::encode_component(v, &mut s);
        s
    };
    let mut t = format!("{bucket_path}/?");
    if let Some(token) = continuation {
        t.push_str(&format!("continuation-token={}&", enc(token)));
    }
    if delimited {
        t.push_str("delimiter=%2F&");
    }
    t.push_str(&format!(
        "list-type=2&max-keys={max_keys}&prefix={}",
        enc(prefix)
    ));
    t
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Xml {
    #[serde(default)]
    contents: Vec<XmlObject>,
    #[serde(default)]
    common_prefixes: Vec<XmlPrefix>,
    #[serde(default)]
    is_truncated: Option<String>,
    #[serde(default)]
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct XmlObject {
    key: String,
    #[serde(default)]
    size: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct XmlPrefix {
    prefix: String,
}

/// Reads one ListObjectsV2 answer (the body of a 200). A truncated page
/// without a continuation token, or an object without a readable size, is
/// an error: the listing cannot go on, or cannot be trusted.
pub fn parse(body: &[u8]) -> Result<Page, String> {
    let text = std::str::from_utf8(body).map_err(|_| "listing is not UTF-8".to_string())?;
    if root_element(text).as_deref() != Some("ListBucketResult") {
        return Err("answer is not a ListBucketResult".into());
    }
    let xml: Xml = quick_xml::de::from_str(text)
        .map_err(|e| format!("listing is not a ListBucketResult: {e}"))?;
    let mut objects = Vec::with_capacity(xml.contents.len());
    for o in xml.contents {
        let size = o
            .size
            .as_deref()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("listed object {:?} has no readable Size", o.key))?;
        objects.push(Listed { key: o.key, size });
    }
    let truncated = xml
        .is_truncated
        .as_deref()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("true"));
    let next = match (truncated, xml.next_continuation_token) {
        (false, _) => None,
        (true, Some(t)) if !t.is_empty() => Some(t),
        (true, _) => return Err("a truncated listing without NextContinuationToken".into()),
    };
    Ok(Page {
        objects,
        prefixes: xml.common_prefixes.into_iter().map(|p| p.prefix).collect(),
        next,
    })
}

/// The name of the document's first element, if it has one.
fn root_element(text: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) | Event::Empty(e) => return Some(e.local_name().as_ref().to_string()),
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// How deep `key` lies below `prefix`: 1 for an object directly in it,
/// one more per `/` after that.
pub fn depth(prefix: &str, key: &str) -> u32 {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    1 + rest.bytes().filter(|&b| b == b'/').count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_in_canonical_form() {
        assert_eq!(
            target("/b", "css/a b+", false, None, 1000),
            "/b/?list-type=2&max-keys=1000&prefix=css%2Fa%20b%2B"
        );
        assert_eq!(
            target("", "", true, Some("tok/en=="), 50),
            "/?continuation-token=tok%2Fen%3D%3D&delimiter=%2F&list-type=2&max-keys=50&prefix="
        );
    }

    #[test]
    fn reads_a_page_with_entities_and_a_token() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>a/</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <Contents><Key>a/x&amp;y.css</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>
    <ETag>&quot;abc&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>a/z.css</Key><Size>0</Size></Contents>
  <CommonPrefixes><Prefix>a/deep/</Prefix></CommonPrefixes>
  <NextContinuationToken>next-1</NextContinuationToken>
</ListBucketResult>"#;
        let page = parse(xml).expect("a page");
        assert_eq!(
            page.objects,
            vec![
                Listed {
                    key: "a/x&y.css".into(),
                    size: 12
                },
                Listed {
                    key: "a/z.css".into(),
                    size: 0
                },
            ]
        );
        assert_eq!(page.prefixes, vec!["a/deep/".to_string()]);
        assert_eq!(page.next.as_deref(), Some("next-1"));
    }

    #[test]
    fn the_last_page_and_an_empty_one() {
        let page = parse(b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>k</Key><Size>3</Size></Contents></ListBucketResult>").expect("page");
        assert_eq!(page.next, None);
        assert_eq!(page.objects.len(), 1);
        let empty =
            parse(b"<ListBucketResult><KeyCount>0</KeyCount></ListBucketResult>").expect("page");
        assert_eq!(empty, Page::default());
    }

    #[test]
    fn refuses_what_cannot_be_trusted() {
        assert!(parse(b"<Error><Code>AccessDenied</Code></Error>").is_err());
        assert!(
            parse(b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>").is_err()
        );
        assert!(parse(
            b"<ListBucketResult><Contents><Key>k</Key><Size>x</Size></Contents></ListBucketResult>"
        )
        .is_err());
        assert!(parse(b"not xml <<<").is_err());
        assert!(parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn depth_below_the_prefix() {
        assert_eq!(depth("css/", "css/a.css"), 1);
        assert_eq!(depth("css/", "css/v/a.css"), 2);
        assert_eq!(depth("", "a/b/c"), 3);
    }
}
