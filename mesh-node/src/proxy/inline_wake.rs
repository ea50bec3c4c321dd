//! A waker for futures one task polls together, such as an HTTP/1.1 connection and
//! the response read from it, or a whole proxied connection. Driving one of them often
//! wakes another (the connection reads a chunk and wakes the body's reader: the same
//! task). Woken while it runs, a tokio task is put back on the run queue and an idle
//! worker thread is woken to take it (a `futex` call and a context switch), only to
//! poll again. Here a wake that comes while the futures are being polled is taken as
//! "poll again now", in the same poll; a wake from outside (a socket, another task)
//! wakes the task as usual.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
};

use futures::task::AtomicWaker;

/// Rounds of polling within one poll before the task yields (woken at once) instead.
const MAX_ROUNDS: usize = 32;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN_WHILE_POLLING: u8 = 2;

#[derive(Default)]
pub(crate) struct InlineWake {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for InlineWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(
            POLLING,
            WOKEN_WHILE_POLLING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // The poll under way sees it and polls again.
            Ok(_) => {}
            Err(WOKEN_WHILE_POLLING) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl InlineWake {
    /// Polls the group with `poll` until it is ready, or pending with no wake from
    /// within; the task behind `cx` is woken by any later wake.
    pub(crate) fn poll<T>(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        let waker = Waker::from(self.clone());
        let mut inner = Context::from_waker(&waker);
        for _ in 0..MAX_ROUNDS {
            self.state.store(POLLING, Ordering::Release);
            let polled = poll(&mut inner);
            let before = self.state.swap(IDLE, Ordering::AcqRel);
            match polled {
                Poll::Ready(t) => {
                    if before == WOKEN_WHILE_POLLING {
                        // Something is ready that nobody polled: the task's next poll.
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Ready(t);
                }
                Poll::Pending if before == WOKEN_WHILE_POLLING => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Polls the group once with a waker that wakes nobody (for a group no task waits
    /// on), and forgets the task that waited last.
    pub(crate) fn poll_unattended<T>(
        self: &Arc<Self>,
        poll: impl FnOnce(&mut Context<'_>) -> T,
    ) -> T {
        self.task.register(Waker::noop());
        poll(&mut Context::from_waker(Waker::noop()))
    }
}

/// A task's future polled under an [`InlineWake`] (see the module's text).
pub(crate) struct Inline<F> {
    future: Pin<Box<F>>,
    wake: Arc<InlineWake>,
}

impl<F: Future> Inline<F> {
    pub(crate) fn new(future: F) -> Inline<F> {
        Inline {
            future: Box::pin(future),
            wake: Arc::default(),
        }
    }
}

impl<F: Future> Future for Inline<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let future = &mut this.future;
        this.wake.poll(cx, |inner| future.as_mut().poll(inner))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts the wakes of the task.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A group, and a task's waker counting its wakes.
    fn group_and_task() -> (Arc<InlineWake>, Arc<Counted>, Waker) {
        let task = Arc::new(Counted::default());
        let waker = Waker::from(task.clone());
        (Arc::default(), task, waker)
    }

    #[test]
    fn a_wake_from_within_polls_again_and_one_from_outside_wakes_the_task() {
        let (wake, task, task_waker) = group_and_task();
        let mut cx = Context::from_waker(&task_waker);
        // The first round wakes itself (as a connection waking its body's reader): a
        // second round runs in the same poll, and the task is not woken.
        let mut rounds = 0;
        let polled = wake.poll(&mut cx, |inner| {
            rounds += 1;
            if rounds == 1 {
                inner.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(polled, Poll::Ready(2));
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        // Pending with a waker kept (as a socket keeps it): its later wake wakes the task.
        let mut kept = None;
        let polled: Poll<()> = wake.poll(&mut cx, |inner| {
            kept = Some(inner.waker().clone());
            Poll::Pending
        });
        assert!(polled.is_pending());
        kept.unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_group_that_always_wakes_itself_yields_instead_of_spinning() {
        let (wake, task, task_waker) = group_and_task();
        let mut cx = Context::from_waker(&task_waker);
        let mut rounds = 0;
        let polled: Poll<()> = wake.poll(&mut cx, |inner| {
            rounds += 1;
            inner.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(rounds, MAX_ROUNDS);
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "woken to run again later");
    }
}
