package quickstart.authz

import rego.v1

req(method, headers) := {"attributes": {"request": {"http": {"method": method, "headers": headers}}}}

test_admin_may_read if {
	decision(req("GET", {"x-role": "admin"})).allowed
}

test_admin_may_write if {
	decision(req("POST", {"x-role": "admin"})).allowed
}

test_admin_role_is_passed_upstream if {
	decision(req("GET", {"x-role": "admin"})).headers["x-legation-role"] == "admin"
}

test_viewer_may_read if {
	decision(req("GET", {"x-role": "viewer"})).allowed
}

test_viewer_may_not_write if {
	not decision(req("DELETE", {"x-role": "viewer"})).allowed
}

test_no_role_is_denied_with_403 if {
	d := decision(req("GET", {}))
	not d.allowed
	d.http_status == 403
}

test_unknown_role_is_denied if {
	not decision(req("GET", {"x-role": "root"})).allowed
}
