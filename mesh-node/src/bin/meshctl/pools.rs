//! A backend's circuit breaking as `meshctl node services` shows it: the limits of its
//! connection pool (a DestinationRule's connectionPool) and their use on this node.

use mesh_node::{discovery::connection_pool::PoolLimits, routing::pool::Occupancy};

fn limit(n: Option<u32>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// `\n  pool: requests 1/100 connections 2/2 pending 3/4, overflows: ...`
pub fn pool_line(limits: &PoolLimits, now: &Occupancy) -> String {
    let mut line = format!(
        "\n  pool (per node): requests {}/{} connections {}/{} pending {}/{}",
        now.active_requests,
        limit(limits.max_requests),
        now.active_connections,
        limit(limits.max_connections),
        now.pending_requests,
        limit(limits.max_pending_requests),
    );
    if limits.max_retries.is_some() || now.active_retries > 0 {
        line.push_str(&format!(
            " retries {}/{}",
            now.active_retries,
            limit(limits.max_retries)
        ));
    }
    let o = &now.overflows;
    if o.requests + o.pending + o.connections + o.retries > 0 {
        line.push_str(&format!(
            ", overflowed: requests {} pending {} connections {} retries {}",
            o.requests, o.pending, o.connections, o.retries
        ));
    }
    if let Some(n) = limits.max_requests_per_connection {
        line.push_str(&format!(", {n} requests per connection"));
    }
    if let Some(n) = limits.max_concurrent_streams {
        line.push_str(&format!(", {n} streams per HTTP/2 connection"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_line_shows_use_against_limits_and_overflows() {
        let limits = PoolLimits {
            max_connections: Some(2),
            max_pending_requests: Some(4),
            max_requests_per_connection: Some(10),
            ..Default::default()
        };
        let mut now = Occupancy {
            active_connections: 2,
            pending_requests: 3,
            ..Default::default()
        };
        assert_eq!(
            pool_line(&limits, &now),
            "\n  pool (per node): requests 0/- connections 2/2 pending 3/4, 10 requests per connection"
        );
        now.overflows.pending = 5;
        assert!(pool_line(&limits, &now)
            .contains("overflowed: requests 0 pending 5 connections 0 retries 0"));
        let limits = PoolLimits {
            max_retries: Some(3),
            max_concurrent_streams: Some(8),
            ..Default::default()
        };
        now.active_retries = 1;
        now.overflows.retries = 2;
        let line = pool_line(&limits, &now);
        assert!(line.contains(" retries 1/3"), "{line}");
        assert!(line.contains("retries 2"), "{line}");
        assert!(
            line.ends_with(", 8 streams per HTTP/2 connection"),
            "{line}"
        );
    }
}
