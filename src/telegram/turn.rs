//! The admission order of one batch of updates. Telegram numbers updates in
//! the order it received them; a batch is handled concurrently (replies and
//! durability waits overlap), but update *i* records anything only after
//! update *i − 1* has recorded what it records, or decided to record
//! nothing. So two requests a user sends one after the other are queued in
//! that order even when they arrive in one batch (§1, arrival order), and
//! the durable waits of the batch still share one flush.

use std::sync::Arc;

use tokio::sync::watch;

/// One update's place in its batch. Waiting gives the update the right to
/// record; passing (explicitly, or by dropping the turn on any path) hands
/// it to the next update.
pub struct Turn {
    mine: u64,
    next: Arc<watch::Sender<u64>>,
    passed: bool,
}

impl Turn {
    /// The turns of a batch of `n` updates, in order.
    pub fn batch(n: usize) -> Vec<Turn> {
        let next = Arc::new(watch::channel(0).0);
        (0..n as u64)
            .map(|mine| Turn {
                mine,
                next: Arc::clone(&next),
                passed: false,
            })
            .collect()
    }

    /// A turn that is never waited for (a single update, tests).
    pub fn alone() -> Turn {
        Turn::batch(1).remove(0)
    }

    /// Resolves once every earlier update of the batch has passed.
    pub async fn wait(&self) {
        let mut rx = self.next.subscribe();
        // The sender lives in every turn of the batch, this one included.
        let _ = rx.wait_for(|n| *n >= self.mine).await;
    }

    /// Lets the next update record. Idempotent.
    pub fn pass(&mut self) {
        if !self.passed {
            self.passed = true;
            let after = self.mine + 1;
            self.next.send_modify(|n| *n = (*n).max(after));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pass();
    }
}
