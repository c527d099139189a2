# Who may read, as a policy (buckets[].authorization, docs/behaviour.md, "Policy
# authorization"). The same file serves OPA (type: opa) and the proxy's own
# Rego engine (type: rego, policy_file).
#
# input: {"jwt_claims": {...}, "bucket": "<name>", "path": "<request path>",
#         "method": "GET" | "HEAD", "client_ip": "<address>"}
package yatagarasu.authz

import rego.v1

default allow := false

# Admins read everything.
allow if input.jwt_claims.role == "admin"

# Readers read the public folder of any bucket, during office hours when
# their token says so.
allow if {
	input.jwt_claims.role == "reader"
	contains(input.path, "/public/")
	input.method in {"GET", "HEAD"}
	office_hours_ok
}

office_hours_ok if not input.jwt_claims.office_hours_only

office_hours_ok if {
	input.jwt_claims.office_hours_only
	[hour, _, _] := time.clock(time.now_ns())
	hour >= 8
	hour < 18
}

# The same decision with a reason (policy path yatagarasu/authz/decision).
decision := {"allow": allow, "reason": reason}

reason := "admin" if input.jwt_claims.role == "admin"

else := "public folder" if allow

else := "not an admin, and not a reader of a public folder"
