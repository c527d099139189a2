//! A bucket's replicas: endpoints, keys and where they come from, breaker
//! and health-check settings, resolved.

use super::super::schema::*;
use super::super::*;
use super::Problems;

/// The bucket's replicas: its `replicas` list, each inheriting the bucket's
/// settings, or one replica named `default` made of the bucket's settings.
pub(super) fn replicas(s3: &RawS3, at3: &str, p: &mut Problems) -> Vec<Replica> {
    p.non_empty(&format!("{at3}.bucket"), &s3.bucket);
    let region = s3.region.as_deref().unwrap_or(DEFAULT_REGION);
    p.non_empty(&format!("{at3}.region"), region);
    own_keys(s3.keys(), at3, p);
    let timeout = s3.timeout_seconds.unwrap_or(DEFAULT_REPLICA_TIMEOUT_SECS);
    p.positive(&format!("{at3}.timeout_seconds"), timeout);
    let Some(list) = &s3.replicas else {
        let implicit = RawReplica {
            name: IMPLICIT_REPLICA.into(),
            ..RawReplica::default()
        };
        return vec![replica(&implicit, s3, at3, p)];
    };
    if list.is_empty() {
        p.at(
            &format!("{at3}.replicas"),
            "must list at least one replica (or be removed)",
        );
    }
    if list.len() > MAX_REPLICAS {
        p.at(
            &format!("{at3}.replicas"),
            format_args!("at most {MAX_REPLICAS} replicas per bucket"),
        );
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(list.len());
    for (r, rep) in list.iter().enumerate() {
        let atr = format!("{at3}.replicas[{r}]");
        if rep.name.trim().is_empty() {
            p.at(&format!("{atr}.name"), "must not be empty");
        } else if let Some(j) = names.insert(&rep.name, r) {
            p.at(
                &format!("{atr}.name"),
                format_args!("{:?} is already used by replicas[{j}]", rep.name),
            );
        }
        out.push(replica(rep, s3, &atr, p));
    }
    out
}

/// One replica: its own keys, else the bucket's (`s3`), else the defaults.
pub(super) fn replica(rep: &RawReplica, s3: &RawS3, at: &str, p: &mut Problems) -> Replica {
    let bucket = rep.bucket.clone().unwrap_or_else(|| s3.bucket.clone());
    if rep.bucket.is_some() {
        p.non_empty(&format!("{at}.bucket"), &bucket);
    }
    let region = rep
        .region
        .as_deref()
        .or(s3.region.as_deref())
        .unwrap_or(DEFAULT_REGION)
        .to_string();
    let endpoint_src = rep.endpoint.as_deref().or(s3.endpoint.as_deref());
    let endpoint = resolve_endpoint(endpoint_src, &bucket, &region, &format!("{at}.endpoint"), p);
    own_keys(rep.keys(), at, p);
    let credentials = credentials(inherit(rep.keys(), s3.keys()), at, p);
    let timeout = rep
        .timeout_seconds
        .or(s3.timeout_seconds)
        .unwrap_or(DEFAULT_REPLICA_TIMEOUT_SECS);
    if rep.timeout_seconds.is_some() {
        p.positive(&format!("{at}.timeout_seconds"), timeout);
    }
    let weight = rep.weight.unwrap_or(DEFAULT_WEIGHT);
    if weight == 0 || weight > MAX_WEIGHT {
        p.at(
            &format!("{at}.weight"),
            format_args!("must be between 1 and {MAX_WEIGHT}"),
        );
    }
    let replica = Replica {
        name: rep.name.clone(),
        virtual_hosted: endpoint_src.is_none() && !bucket.contains('.'),
        endpoint,
        bucket,
        region,
        credentials,
        priority: rep.priority.unwrap_or(DEFAULT_PRIORITY),
        weight: weight.max(1),
        timeout: Duration::from_secs(timeout.max(1)),
        ca_file: rep.ca_file.clone().or_else(|| s3.ca_file.clone()),
        insecure_skip_verify: rep
            .insecure_skip_verify
            .or(s3.insecure_skip_verify)
            .unwrap_or(false),
    };
    check_tls(&replica, at, p);
    replica
}

/// The name of the one replica of a bucket without a `replicas` list.
pub(super) const IMPLICIT_REPLICA: &str = "default";

/// Checks the credential keys written at one level (`s3` or a replica).
pub(super) fn own_keys(k: RawKeys<'_>, at: &str, p: &mut Problems) {
    for (key, value) in [
        ("access_key", k.access_key),
        ("secret_key", k.secret_key),
        ("access_key_file", k.access_key_file),
        ("secret_key_file", k.secret_key_file),
    ] {
        if value.is_some_and(|v| v.is_empty()) {
            p.at(&format!("{at}.{key}"), "must not be empty");
        }
    }
}

/// A replica's credential keys: its own, and the bucket's for the ones it
/// leaves out, except that a replica choosing one kind of source (static
/// keys, or key files / a provider) does not inherit the other kind.
pub(super) fn inherit<'a>(rep: RawKeys<'a>, bucket: RawKeys<'a>) -> RawKeys<'a> {
    let rep_static = rep.access_key.is_some() || rep.secret_key.is_some();
    let rep_other = rep.access_key_file.is_some()
        || rep.secret_key_file.is_some()
        || rep
            .credentials
            .is_some_and(|c| c.provider != RawProvider::Static);
    let from_bucket = |mine: Option<&'a str>, theirs: Option<&'a str>, allowed: bool| {
        mine.or(if allowed { theirs } else { None })
    };
    RawKeys {
        access_key: from_bucket(rep.access_key, bucket.access_key, !rep_other),
        secret_key: from_bucket(rep.secret_key, bucket.secret_key, !rep_other),
        access_key_file: from_bucket(rep.access_key_file, bucket.access_key_file, !rep_static),
        secret_key_file: from_bucket(rep.secret_key_file, bucket.secret_key_file, !rep_static),
        credentials: rep.credentials.or(if rep_static {
            bucket
                .credentials
                .filter(|c| c.provider == RawProvider::Static)
        } else {
            bucket.credentials
        }),
    }
}

/// Resolves where a replica's keys come from; exactly one source must be
/// given (no silent fallback to ambient credentials).
pub(super) fn credentials(k: RawKeys<'_>, at: &str, p: &mut Problems) -> CredentialSource {
    let provider = k.credentials.map(|c| c.provider);
    let has_static = k.access_key.is_some() || k.secret_key.is_some();
    let has_files = k.access_key_file.is_some() || k.secret_key_file.is_some();
    let pair = |p: &mut Problems, a: (&str, Option<&str>), b: (&str, Option<&str>)| {
        for ((name, value), (other, _)) in [(a, b), (b, a)] {
            if value.is_none() {
                p.at(
                    &format!("{at}.{name}"),
                    format_args!("missing ({other} is set)"),
                );
            }
        }
        (
            a.1.unwrap_or_default().to_string(),
            b.1.unwrap_or_default().to_string(),
        )
    };
    let base = match provider {
        None | Some(RawProvider::Static) => {
            if has_static && has_files {
                p.at(
                    &format!("{at}.access_key_file"),
                    "cannot be combined with access_key/secret_key; choose one",
                );
            }
            if has_static {
                let (access_key, secret_key) = pair(
                    p,
                    ("access_key", k.access_key),
                    ("secret_key", k.secret_key),
                );
                CredentialBase::Static {
                    access_key,
                    secret_key,
                }
            } else if has_files {
                let (access_key_file, secret_key_file) = pair(
                    p,
                    ("access_key_file", k.access_key_file),
                    ("secret_key_file", k.secret_key_file),
                );
                for (key, path) in [
                    ("access_key_file", &access_key_file),
                    ("secret_key_file", &secret_key_file),
                ] {
                    if path.is_empty() {
                        continue;
                    }
                    match std::fs::read_to_string(path) {
                        Ok(v) if v.trim().is_empty() => {
                            p.at(&format!("{at}.{key}"), format_args!("{path} is empty"))
                        }
                        Ok(_) => {}
                        Err(e) => p.at(
                            &format!("{at}.{key}"),
                            format_args!("cannot read {path}: {e}"),
                        ),
                    }
                }
                CredentialBase::Files {
                    access_key_file,
                    secret_key_file,
                }
            } else {
                p.at(
                    at,
                    "no credentials: set access_key and secret_key, access_key_file and secret_key_file, or credentials.provider",
                );
                CredentialBase::Static {
                    access_key: String::new(),
                    secret_key: String::new(),
                }
            }
        }
        Some(kind) => {
            for (set, key) in [(has_static, "access_key"), (has_files, "access_key_file")] {
                if set {
                    p.at(
                        &format!("{at}.{key}"),
                        format_args!(
                            "cannot be combined with credentials.provider {:?} (remove one)",
                            provider_name(kind)
                        ),
                    );
                }
            }
            let profile = k.credentials.and_then(|c| c.profile.clone());
            CredentialBase::Provider(match kind {
                RawProvider::DefaultChain => ProviderKind::DefaultChain,
                RawProvider::Environment => ProviderKind::Environment,
                RawProvider::Profile => ProviderKind::Profile(profile.clone()),
                RawProvider::WebIdentity => ProviderKind::WebIdentity,
                RawProvider::Ecs => ProviderKind::Ecs,
                // (static is the arm above)
                RawProvider::Imds | RawProvider::Static => ProviderKind::Imds,
            })
        }
    };
    let Some(c) = k.credentials else {
        return CredentialSource {
            base,
            assume_role: None,
        };
    };
    if c.profile.is_some() && c.provider != RawProvider::Profile {
        p.at(
            &format!("{at}.credentials.profile"),
            "is only used with provider \"profile\"",
        );
    }
    if c.profile.as_deref() == Some("") {
        p.at(&format!("{at}.credentials.profile"), "must not be empty");
    }
    let assume_role = c
        .assume_role
        .as_ref()
        .map(|r| assume_role(r, &format!("{at}.credentials.assume_role"), p));
    CredentialSource { base, assume_role }
}

/// `credentials.assume_role`: STS AssumeRole over the base source.
fn assume_role(r: &RawAssumeRole, at: &str, p: &mut Problems) -> AssumeRole {
    if !r.role_arn.starts_with("arn:") {
        p.at(
            &format!("{at}.role_arn"),
            format_args!(
                "{:?} is not a role ARN (arn:aws:iam::<account>:role/<name>)",
                r.role_arn
            ),
        );
    }
    let session_name = r
        .session_name
        .clone()
        .unwrap_or_else(|| DEFAULT_SESSION_NAME.to_string());
    if session_name.is_empty() {
        p.at(&format!("{at}.session_name"), "must not be empty");
    }
    if r.external_id.as_deref() == Some("") {
        p.at(&format!("{at}.external_id"), "must not be empty");
    }
    AssumeRole {
        role_arn: r.role_arn.clone(),
        session_name,
        external_id: r.external_id.clone(),
    }
}

pub(super) fn provider_name(p: RawProvider) -> &'static str {
    match p {
        RawProvider::Static => "static",
        RawProvider::DefaultChain => "default_chain",
        RawProvider::Environment => "environment",
        RawProvider::Profile => "profile",
        RawProvider::WebIdentity => "web_identity",
        RawProvider::Ecs => "ecs",
        RawProvider::Imds => "imds",
    }
}

pub(super) fn breaker(
    raw: Option<&RawCircuitBreaker>,
    at: &str,
    p: &mut Problems,
) -> BreakerSettings {
    let mut b = BreakerSettings::default();
    let Some(cb) = raw else { return b };
    b.failure_threshold = cb.failure_threshold.unwrap_or(b.failure_threshold);
    b.success_threshold = cb.success_threshold.unwrap_or(b.success_threshold);
    b.open_for = cb.timeout_seconds.map_or(b.open_for, Duration::from_secs);
    b.half_open_requests = cb.half_open_requests.unwrap_or(b.half_open_requests);
    for (v, key) in [
        (b.failure_threshold, "failure_threshold"),
        (b.success_threshold, "success_threshold"),
        (b.half_open_requests, "half_open_requests"),
    ] {
        p.positive(&format!("{at}.{key}"), v as u64);
    }
    p.positive(&format!("{at}.timeout_seconds"), b.open_for.as_secs());
    b
}

pub(super) fn health(raw: Option<&RawHealthCheck>) -> HealthSettings {
    let mut h = HealthSettings::default();
    if let Some(r) = raw {
        h.enabled = r.enabled.unwrap_or(true);
        h.interval = r.interval_seconds.map_or(h.interval, Duration::from_secs);
        h.timeout = r.timeout_seconds.map_or(h.timeout, Duration::from_secs);
        h.path = r.path.clone().unwrap_or(h.path);
    }
    h
}

pub(super) fn check_health(h: &RawHealthCheck, at: &str, p: &mut Problems) {
    if let Some(v) = h.interval_seconds {
        p.positive(&format!("{at}.interval_seconds"), v);
    }
    if let Some(v) = h.timeout_seconds {
        p.positive(&format!("{at}.timeout_seconds"), v);
    }
    if let Some(path) = &h.path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
            p.at(
                &format!("{at}.path"),
                format_args!("{path:?} must start with '/' and contain no spaces"),
            );
        }
    }
}

/// `ca_file` must be readable PEM, and TLS settings need an https endpoint.
pub(super) fn check_tls(r: &Replica, at: &str, p: &mut Problems) {
    if !r.endpoint.tls && (r.ca_file.is_some() || r.insecure_skip_verify) {
        p.at(
            at,
            "ca_file and insecure_skip_verify apply to https:// endpoints only (this one is http://)",
        );
    }
    if let Some(path) = &r.ca_file {
        if let Err(e) = crate::tls::load_pem_certs(path) {
            p.at(&format!("{at}.ca_file"), e);
        }
    }
}

/// Parses `http://host[:port][/]`, or builds the AWS regional endpoint when absent.
pub(super) fn resolve_endpoint(
    src: Option<&str>,
    bucket: &str,
    region: &str,
    at: &str,
    p: &mut Problems,
) -> Endpoint {
    let Some(src) = src else {
        let host = if bucket.contains('.') {
            format!("s3.{region}.amazonaws.com")
        } else {
            format!("{bucket}.s3.{region}.amazonaws.com")
        };
        return Endpoint {
            tls: true,
            authority: host.clone(),
            host,
            port: 443,
        };
    };
    parse_endpoint(src).unwrap_or_else(|e| {
        p.at(at, format_args!("{src:?} {e}"));
        Endpoint {
            tls: false,
            host: "invalid".into(),
            port: 80,
            authority: "invalid".into(),
        }
    })
}

/// `scheme://host[:port]` with no path; the error completes "<src> ...".
pub(in crate::config) fn parse_endpoint(src: &str) -> Result<Endpoint, &'static str> {
    let (tls, rest) = if let Some(r) = src.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = src.strip_prefix("https://") {
        (true, r)
    } else {
        return Err("must start with http:// or https://");
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err("must be scheme://host[:port] with no path");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or("has an unclosed IPv6 bracket")?;
        (format!("[{h}]"), tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, port)) => (h.to_string(), Some(port)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(v) => match v.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err("has an invalid port"),
        },
    };
    let authority = if port == default_port {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    Ok(Endpoint {
        tls,
        host,
        port,
        authority,
    })
}
