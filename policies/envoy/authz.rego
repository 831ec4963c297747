# The OPA-Envoy tutorial's policy, for Legation: the role comes from a verified JWT claim
# (the `jwt` check puts the claims in input.jwt.claims), rules look at the path and method.
# Route it with context_extensions {policy: envoy.authz, checks: "jwt,authz"}.
#
# The decision is a function of the request document so that the tests below can call it
# directly: regopy 1.5 (rego-cpp) crashes on `with input as` over rules that use other rules.
#
# `allow` names the input fields it reads (input.a.b refs) instead of passing `input` whole:
# Legation then hands the engine only those fields, which costs far less per request than the
# whole document (each node costs microseconds to hand over). Passing `input` itself works too.
package envoy.authz

import rego.v1

allow := decision({
	"attributes": {"request": {"http": {"method": input.attributes.request.http.method}}},
	"parsed_path": input.parsed_path,
	"jwt": {"claims": claims},
	"parsed_body": body,
	"truncated_body": truncated,
})

default claims := {}

claims := input.jwt.claims

default body := null

body := input.parsed_body

default truncated := true

truncated := input.truncated_body

decision(req) := {
	"allowed": true,
	"headers": {"x-legation-role": req.jwt.claims.role},
	"response_headers_to_add": {"x-legation-policy": "envoy.authz"},
} if {
	action_allowed(req)
} else := {
	"allowed": false,
	"http_status": 403,
	"body": "{\"error\":\"forbidden\",\"policy\":\"envoy.authz\"}",
	"headers": {"content-type": "application/json", "x-legation-policy": "envoy.authz"},
}

# guests read the list of people
action_allowed(req) if {
	req.jwt.claims.role == "guest"
	req.attributes.request.http.method == "GET"
	req.parsed_path == ["people"]
}

# admins read anyone
action_allowed(req) if {
	req.jwt.claims.role == "admin"
	req.attributes.request.http.method == "GET"
	req.parsed_path[0] == "people"
}

# admins add people, and only themselves by name (the JSON body's firstname is their subject)
action_allowed(req) if {
	req.jwt.claims.role == "admin"
	req.attributes.request.http.method == "POST"
	req.parsed_path == ["people"]
	not req.truncated_body
	lower(req.parsed_body.firstname) == req.jwt.claims.sub
}
