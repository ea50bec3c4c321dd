//! A pod's mirrored request copies in flight (`proxy::http::mirror`): a bound that one
//! pod's traffic cannot push past, so copies never pile up on the node.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// Copies one pod may have in flight at once; more are dropped (and counted).
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// A pod's copies in flight.
#[derive(Debug, Default)]
pub(crate) struct MirrorSlots(Arc<AtomicUsize>);

pub(crate) struct MirrorSlot(Arc<AtomicUsize>);

impl MirrorSlots {
    pub(crate) fn take(&self) -> Option<MirrorSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| MirrorSlot(self.0.clone()))
    }
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_has_a_bounded_number_of_copies_in_flight() {
        let slots = MirrorSlots::default();
        let held: Vec<_> = (0..MAX_IN_FLIGHT).map_while(|_| slots.take()).collect();
        assert_eq!(held.len(), MAX_IN_FLIGHT);
        assert!(slots.take().is_none());
        drop(held);
        assert!(slots.take().is_some());
    }
}
