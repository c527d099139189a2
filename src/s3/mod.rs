//! S3 specifics: SigV4 request signing (with `aws-sigv4`) and reading S3 error codes.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use std::time::SystemTime;

/// Signs requests for one replica (one access key, one region).
pub struct Signer {
    identity: Identity,
    region: String,
    settings: SigningSettings,
}

impl Signer {
    pub fn new(access_key: &str, secret_key: &str, region: &str) -> Signer {
        let creds = Credentials::new(access_key, secret_key, None, None, "yatagarasu-config");
        let mut settings = SigningSettings::default();
        // S3's rules: the path is signed exactly as sent (already encoded once,
        // never normalised), and the payload hash travels in x-amz-content-sha256.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        Signer {
            identity: creds.into(),
            region: region.to_string(),
            settings,
        }
    }

    /// Appends the signing headers (`x-amz-date`, `x-amz-content-sha256`,
    /// `authorization`) for `method host path` as `name: value\r\n` lines.
    pub fn sign_into(
        &self,
        method: &str,
        host: &str,
        path: &str,
        now: SystemTime,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(now)
            .settings(self.settings.clone())
            .build()
            .map_err(|e| format!("signing parameters: {e}"))?
            .into();
        let headers = [("host", host)];
        let request = SignableRequest::new(
            method,
            path,
            headers.into_iter(),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| format!("signing request: {e}"))?;
        let (instructions, _signature) = sign(request, &params)
            .map_err(|e| format!("signing: {e}"))?
            .into_parts();
        for (name, value) in instructions.headers() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

/// The `<Code>` of an S3 XML error body, if there is one.
pub fn error_code(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let end = text[start..].find("</Code>")? + start;
    Some(&text[start..end])
}

/// Error codes meaning "this replica is misconfigured", not "the object says no".
pub fn is_broken_replica_code(code: &str) -> bool {
    matches!(code, "InvalidAccessKeyId" | "SignatureDoesNotMatch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_s3_headers() {
        let s = Signer::new("AKID", "SECRET", "us-east-1");
        let mut out = Vec::new();
        s.sign_into(
            "GET",
            "127.0.0.1:9000",
            "/bucket/a%20b",
            SystemTime::UNIX_EPOCH,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("x-amz-date: 19700101T000000Z\r\n"), "{text}");
        assert!(
            text.contains("x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"),
            "{text}"
        );
        assert!(text.contains("authorization: AWS4-HMAC-SHA256 Credential=AKID/19700101/us-east-1/s3/aws4_request"), "{text}");
        assert!(
            text.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date"),
            "{text}"
        );
    }

    #[test]
    fn reads_error_codes() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(error_code(body), Some("SignatureDoesNotMatch"));
        assert!(is_broken_replica_code("InvalidAccessKeyId"));
        assert!(!is_broken_replica_code("NoSuchKey"));
        assert_eq!(error_code(b"nothing"), None);
    }
}
