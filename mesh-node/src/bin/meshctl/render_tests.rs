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

#[test]
fn the_status_handover_line_says_who_took_over_and_how_the_predecessor_drains() {
    use mesh_node::handover::HandoverView;
    assert_eq!(crate::render::handover(&HandoverView::default()), "none");
    let mut taker = HandoverView {
        took_over_from: Some(41),
        inherited_listeners: 9,
        predecessor_draining: Some(3),
        ..HandoverView::default()
    };
    assert_eq!(
        crate::render::handover(&taker),
        "took the node over from pid 41 (9 listeners inherited); it still drains 3 connections"
    );
    taker.predecessor_drained = Some((20, 1));
    taker.predecessor_exited = true;
    assert!(
        crate::render::handover(&taker).ends_with("it drained (20 completed, 1 cut) and exited")
    );
    let giver = HandoverView {
        handed_over_to: Some(42),
        ..HandoverView::default()
    };
    assert_eq!(
        crate::render::handover(&giver),
        "handed the node over to pid 42"
    );
}
