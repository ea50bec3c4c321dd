//! Routing: where a connection or request goes — destination → Service → route rule →
//! backend → endpoint → transport — decided in one place ([`plan`]) from the routing
//! table of the current discovery snapshot ([`table`]), with the balancers that pick
//! among endpoints and learn what became of each pick ([`balancer`]).

pub(crate) mod backend;
pub mod balancer;
pub mod hash_key;
pub mod hash_ring;
pub mod http;
pub mod outlier;
pub mod plan;
pub mod pool;
pub mod resolve;
pub mod splits;
pub mod table;
pub(crate) mod transport;

#[cfg(test)]
mod lb_tests;
