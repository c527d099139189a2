//! S3 specifics: SigV4 request signing and reading S3 error codes.
//!
//! Signing uses `aws-sigv4` for the cryptography (signing-key derivation and
//! the final HMAC) and builds the canonical request itself: a proxy's upstream
//! requests all have the same shape (`GET`/`HEAD`, a path, `host`,
//! `x-amz-content-sha256: UNSIGNED-PAYLOAD`, `x-amz-date`), so the canonical
//! request is one short string, and the derived signing key is cached per day
//! (region and service are fixed per replica). A unit test checks the result
//! byte for byte against `aws-sigv4`'s own full signer.

pub mod list;

use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Signs requests for one replica (one set of credentials, one region). Not
/// `Sync`: each core owns its signers, and the key cache is a plain `RefCell`.
/// Temporary credentials add their session token as `x-amz-security-token`,
/// which is signed.
pub struct Signer {
    access_key: String,
    secret_key: String,
    session_token: Option<String>,
    region: String,
    /// `(days since epoch, signing key)` for the current UTC day.
    key: RefCell<Option<(u64, [u8; 32])>>,
    scratch: RefCell<String>,
}

const SIGNED_HEADERS: &str = "host;x-amz-content-sha256;x-amz-date";
const SIGNED_HEADERS_WITH_TOKEN: &str = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token";
const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

impl Signer {
    /// A signer for one set of credentials and a region.
    pub fn new(creds: &crate::credentials::Credentials, region: &str) -> Signer {
        Signer {
            access_key: creds.access_key.clone(),
            secret_key: creds.secret_key.clone(),
            session_token: creds.session_token.clone(),
            region: region.to_string(),
            key: RefCell::new(None),
            scratch: RefCell::new(String::with_capacity(512)),
        }
    }

    fn signing_key(&self, day: u64, now: SystemTime) -> [u8; 32] {
        if let Some((d, k)) = *self.key.borrow() {
            if d == day {
                return k;
            }
        }
        let derived = generate_signing_key(&self.secret_key, now, &self.region, "s3");
        let mut k = [0u8; 32];
        k.copy_from_slice(&derived.as_ref()[..32]);
        *self.key.borrow_mut() = Some((day, k));
        k
    }

    /// Appends the signing headers (`x-amz-date`, `x-amz-content-sha256`,
    /// `authorization`) for `method host path` as `name: value\r\n` lines.
    /// `target` is the URI-encoded path, optionally followed by `?` and a
    /// query already in SigV4 canonical form (sorted, encoded); both are
    /// signed exactly as sent.
    pub fn sign_into(
        &self,
        method: &str,
        host: &str,
        target: &str,
        now: SystemTime,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!("invalid host {host:?} for signing"));
        }
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "clock before 1970".to_string())?
            .as_secs();
        let (y, mo, d, h, mi, s) = crate::clock::civil(secs);
        let mut amz_date = [0u8; 16];
        let _ = write_date(&mut amz_date, y, mo, d, h, mi, s);
        let amz_date = std::str::from_utf8(&amz_date).map_err(|_| "date".to_string())?;
        let date = &amz_date[..8];
        let key = self.signing_key(secs / 86_400, now);

        let signature = self.signature(key, method, host, path, query, amz_date);
        if let Some(token) = &self.session_token {
            for part in ["x-amz-security-token: ", token, "\r\n"] {
                out.extend_from_slice(part.as_bytes());
            }
        }
        for part in [
            "x-amz-date: ",
            amz_date,
            "\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\nauthorization: AWS4-HMAC-SHA256 Credential=",
            &self.access_key,
            "/",
            date,
            "/",
            &self.region,
            "/s3/aws4_request, SignedHeaders=",
            self.signed_headers(),
            ", Signature=",
            &signature,
            "\r\n",
        ] {
            out.extend_from_slice(part.as_bytes());
        }
        Ok(())
    }

    fn signed_headers(&self) -> &'static str {
        match self.session_token {
            Some(_) => SIGNED_HEADERS_WITH_TOKEN,
            None => SIGNED_HEADERS,
        }
    }

    /// The request signature: canonical request, its hash in the string to
    /// sign, HMAC with the day's key. Built without formatting machinery:
    /// this runs for every upstream request.
    fn signature(
        &self,
        key: [u8; 32],
        method: &str,
        host: &str,
        path: &str,
        query: &str,
        amz_date: &str,
    ) -> String {
        let mut c = self.scratch.borrow_mut();
        c.clear();
        for part in [
            method,
            "\n",
            path,
            "\n",
            query,
            "\nhost:",
            host,
            "\nx-amz-content-sha256:",
            UNSIGNED,
            "\nx-amz-date:",
            amz_date,
            "\n",
        ] {
            c.push_str(part);
        }
        if let Some(token) = &self.session_token {
            for part in ["x-amz-security-token:", token, "\n"] {
                c.push_str(part);
            }
        }
        for part in ["\n", self.signed_headers(), "\n", UNSIGNED] {
            c.push_str(part);
        }
        let hash = Sha256::digest(c.as_bytes());
        c.clear();
        for part in [
            "AWS4-HMAC-SHA256\n",
            amz_date,
            "\n",
            &amz_date[..8],
            "/",
            &self.region,
            "/s3/aws4_request\n",
        ] {
            c.push_str(part);
        }
        push_hex(&mut c, &hash);
        calculate_signature(key, c.as_bytes())
    }
}

/// Appends `bytes` (at most 32) as lowercase hex, without allocating.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    let mut buf = [0u8; 64];
    let n = bytes.len().min(32);
    let hex = &mut buf[..n * 2];
    if hex::encode_to_slice(&bytes[..n], hex).is_ok() {
        // Hex digits are ASCII.
        out.push_str(std::str::from_utf8(hex).unwrap_or_default());
    }
}

fn write_date(out: &mut [u8; 16], y: i64, mo: u32, d: u32, h: u64, mi: u64, s: u64) -> Option<()> {
    let mut w = |pos: usize, v: u64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            out[pos + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    w(0, y.max(0) as u64, 4);
    w(4, mo as u64, 2);
    w(6, d as u64, 2);
    w(9, h, 2);
    w(11, mi, 2);
    w(13, s, 2);
    out[8] = b'T';
    out[15] = b'Z';
    Some(())
}

/// The `<Code>` of an S3 XML error body, if there is one.
pub fn error_code(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let end = text[start..].find("</Code>")? + start;
    Some(&text[start..end])
}

/// Error codes meaning "this replica refuses our keys", not "the object says
/// no". `NotSignedUp` is what S3 (and s3s) answer for an access key whose
/// account it does not know.
pub fn is_broken_replica_code(code: &str) -> bool {
    matches!(
        code,
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "NotSignedUp"
    ) || is_expired_token_code(code)
}

/// Error codes meaning "these temporary credentials are no longer good":
/// worth a refresh and one more try before the replica counts as failed.
pub fn is_expired_token_code(code: &str) -> bool {
    matches!(
        code,
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" | "ExpiredTokenException"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
        SigningSettings, UriPathNormalizationMode,
    };
    use aws_sigv4::sign::v4;
    use aws_smithy_runtime_api::client::identity::Identity;
    use std::time::Duration;

    /// aws-sigv4's complete signer, configured for S3: the reference.
    fn reference(
        c: &crate::credentials::Credentials,
        region: &str,
        method: &str,
        host: &str,
        path: &str,
        now: SystemTime,
    ) -> String {
        let identity: Identity = Credentials::new(
            &c.access_key,
            &c.secret_key,
            c.session_token.clone(),
            None,
            "test",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("s3")
            .time(now)
            .settings(settings)
            .build()
            .unwrap()
            .into();
        let req = SignableRequest::new(
            method,
            path,
            [("host", host)].into_iter(),
            SignableBody::UnsignedPayload,
        )
        .unwrap();
        let (instr, _) = sign(req, &params).unwrap().into_parts();
        let mut out = String::new();
        let mut headers: Vec<_> = instr.headers().collect();
        headers.sort();
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out
    }

    fn ours(s: &Signer, method: &str, host: &str, path: &str, now: SystemTime) -> String {
        let mut out = Vec::new();
        s.sign_into(method, host, path, now, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines: Vec<&str> = text.split_inclusive("\r\n").collect();
        lines.sort();
        lines.concat()
    }

    fn creds(ak: &str, sk: &str, token: Option<&str>) -> crate::credentials::Credentials {
        crate::credentials::Credentials {
            access_key: ak.into(),
            secret_key: sk.into(),
            session_token: token.map(str::to_string),
            expires: None,
        }
    }

    #[test]
    fn matches_aws_sigv4_byte_for_byte() {
        for token in [None, Some("FwoGZXIvYXdzEJr//////////wEaDO+session/token==")] {
            byte_for_byte(token);
        }
    }

    fn byte_for_byte(token: Option<&str>) {
        let keys = creds(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token,
        );
        let s = Signer::new(&keys, "eu-west-1");
        let cases = [
            ("GET", "127.0.0.1:9000", "/bucket/a%20b/%E6%97%A5~x.txt"),
            ("HEAD", "[::1]:9002", "/bucket/"),
            ("GET", "my-bucket.s3.eu-west-1.amazonaws.com", "/k%2Bplus"),
            (
                "GET",
                "127.0.0.1:9000",
                "/bucket/k?partNumber=2&versionId=a%2Fb%2Bc",
            ),
        ];
        for (i, (m, h, p)) in cases.iter().enumerate() {
            for t in [0u64, 1_795_647_737, 1_795_647_737 + 86_400 * 40 + 7] {
                let now = UNIX_EPOCH + Duration::from_secs(t + i as u64);
                assert_eq!(
                    ours(&s, m, h, p, now),
                    reference(&keys, "eu-west-1", m, h, p, now),
                    "{m} {h} {p} at {t}"
                );
            }
        }
    }

    #[test]
    fn key_cache_follows_the_day() {
        let keys = creds("A", "S", None);
        let s = Signer::new(&keys, "us-east-1");
        let day1 = UNIX_EPOCH + Duration::from_secs(86_400 * 100 + 5);
        let day2 = UNIX_EPOCH + Duration::from_secs(86_400 * 101 + 5);
        assert_eq!(
            ours(&s, "GET", "h", "/b/k", day1),
            reference(&keys, "us-east-1", "GET", "h", "/b/k", day1)
        );
        assert_eq!(
            ours(&s, "GET", "h", "/b/k", day2),
            reference(&keys, "us-east-1", "GET", "h", "/b/k", day2)
        );
        assert_eq!(s.key.borrow().map(|(d, _)| d), Some(101));
    }

    #[test]
    fn reads_error_codes() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(error_code(body), Some("SignatureDoesNotMatch"));
        assert!(is_broken_replica_code("InvalidAccessKeyId"));
        assert!(is_broken_replica_code("NotSignedUp"));
        assert!(is_broken_replica_code("ExpiredToken"));
        assert!(!is_broken_replica_code("AccessDenied"));
        assert!(!is_broken_replica_code("NoSuchKey"));
        assert_eq!(error_code(b"nothing"), None);
    }
}
