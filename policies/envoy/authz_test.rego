package envoy.authz

import rego.v1

req(method, path, role) := {
	"attributes": {"request": {"http": {"method": method, "path": path}}},
	"parsed_path": split(trim_left(path, "/"), "/"),
	"jwt": {"claims": {"role": role, "sub": "alice"}},
}

test_guest_can_list_people if {
	decision(req("GET", "/people", "guest")).allowed
}

test_guest_cannot_read_one_person if {
	not decision(req("GET", "/people/bob", "guest")).allowed
}

test_admin_can_read_one_person if {
	decision(req("GET", "/people/bob", "admin")).allowed
}

test_guest_cannot_post if {
	not decision(object.union(req("POST", "/people", "guest"), {"parsed_body": {"firstname": "Alice"}})).allowed
}

test_admin_can_add_self if {
	decision(object.union(req("POST", "/people", "admin"), {"parsed_body": {"firstname": "Alice"}})).allowed
}

test_admin_cannot_add_someone_else if {
	not decision(object.union(req("POST", "/people", "admin"), {"parsed_body": {"firstname": "Bob"}})).allowed
}

test_no_token_denied_with_status if {
	result := decision({"attributes": {"request": {"http": {"method": "GET", "path": "/people"}}}, "parsed_path": ["people"]})
	result.allowed == false
	result.http_status == 403
}

test_role_forwarded_upstream if {
	result := decision(req("GET", "/people", "guest"))
	result.headers["x-legation-role"] == "guest"
}
