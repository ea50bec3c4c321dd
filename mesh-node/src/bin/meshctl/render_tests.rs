//! Tables of `meshctl node` views from sample admin API answers.

use mesh_node::admin::api::ServiceView;

use crate::render::services;

#[test]
fn an_http_routed_service_shows_its_route_and_rule_backends() {
    // The admin API's /services row of the example's `web` (HTTPRoute 90/10).
    let v: Vec<ServiceView> = serde_json::from_str(
        r#"[{"service": {"namespace": "demo", "name": "web"}, "vips": ["10.96.0.10"], "port": 80,
            "resolution": {"kind": "service", "service": {"namespace": "demo", "name": "web"}, "port": 80, "route": null,
                "backends": [{"service": {"namespace": "demo", "name": "web"}, "port": 80, "weight": 1, "endpoints": [],
                    "least_connections": false}]},
            "http_routes": [{"kind": "HTTPRoute", "route": {"namespace": "demo", "name": "web-split"},
                "parents": [{"service": {"namespace": "demo", "name": "web"}, "port": 80}], "chosen": "per_request",
                "rules": [{"index": 0, "name": null, "matches": [], "backends": [
                    {"service": {"namespace": "demo", "name": "web-v1"}, "port": 80, "weight": 90, "ready_endpoints": 2,
                        "picks": 0, "observed_share": null},
                    {"service": {"namespace": "demo", "name": "web-v2"}, "port": 80, "weight": 10, "ready_endpoints": 1,
                        "picks": 0, "observed_share": null}]}]}]}]"#,
    )
    .unwrap();
    let text = services(&v);
    assert!(text.contains("HTTPRoute demo/web-split"), "{text}");
    assert!(
        text.contains("demo/web-v1 :80 weight 90 (2 ready)"),
        "{text}"
    );
    assert!(
        text.contains("demo/web-v2 :80 weight 10 (1 ready)"),
        "{text}"
    );
}
