# The quickstart's policy (examples/quickstart, route `admin`: `authz: quickstart.authz`).
# The x-role request header decides: admin may do anything, viewer may only read. A demo: in
# production the role comes from a verified JWT claim (see policies/envoy/authz.rego).
#
# The decision is a function of the request document so that the tests can call it directly
# (regopy crashes on `with input as` over rules that use other rules).
package quickstart.authz

import rego.v1

allow := decision(input)

decision(req) := {
	"allowed": true,
	"headers": {"x-legation-role": role(req)},
	"response_headers_to_add": {"x-legation-policy": "quickstart.authz"},
} if {
	permitted(req)
} else := {
	"allowed": false,
	"http_status": 403,
	"body": "{\"error\":\"forbidden\",\"policy\":\"quickstart.authz\"}\n",
	"headers": {"content-type": "application/json", "x-legation-policy": "quickstart.authz"},
}

role(req) := req.attributes.request.http.headers["x-role"]

permitted(req) if role(req) == "admin"

permitted(req) if {
	role(req) == "viewer"
	req.attributes.request.http.method in {"GET", "HEAD"}
}
