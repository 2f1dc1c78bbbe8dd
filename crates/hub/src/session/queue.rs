//! A session's bounded outbound queue: many senders (the registry, the session), one reader (its writer).
//!
//! Not tokio's `mpsc`: that allocates its first block of 32 slots (~1.6 KB of `Outbound`)
//! with the channel, and an idle session would carry it for its whole life. This queue
//! holds nothing until something is queued, and gives back what a burst grew once it is
//! drained. Senders and the reader are on different threads; the lock is held only to
//! push or pop one item.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::Outbound;

/// A drained queue keeps at most this many slots.
const KEEP_CAPACITY: usize = 8;

struct Shared {
    state: Mutex<State>,
    reader: AtomicWaker,
    capacity: usize,
}

struct State {
    items: VecDeque<Outbound>,
    senders: usize,
    reader_gone: bool,
}

/// Makes a queue that holds at most `capacity` items.
pub fn channel(capacity: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            reader_gone: false,
        }),
        reader: AtomicWaker::new(),
        capacity,
    });
    (QueueSender(Arc::clone(&shared)), QueueReceiver(shared))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent: push and pop are single steps.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct QueueSender(Arc<Shared>);

impl QueueSender {
    /// Queues `item` unless the queue is full or its reader is gone.
    pub fn try_send(&self, item: Outbound) -> Result<(), TrySendError<Outbound>> {
        self.push_quietly(item)?;
        self.wake();
        Ok(())
    }

    /// Wakes the writer for items pushed with [`Self::push_quietly`].
    pub fn wake(&self) {
        self.0.reader.wake();
    }

    /// Like `try_send`, but answers how many items the queue holds (`item` included) and
    /// leaves waking the writer to the caller (through [`Self::waker`]), so that a fan-out
    /// can wake each worker's writers from that worker's own thread.
    pub fn push_quietly(&self, item: Outbound) -> Result<usize, TrySendError<Outbound>> {
        let mut state = self.0.lock();
        if state.reader_gone {
            return Err(TrySendError::Closed(item));
        }
        if state.items.len() >= self.0.capacity {
            return Err(TrySendError::Full(item));
        }
        state.items.push_back(item);
        Ok(state.items.len())
    }

    /// Wakes the writer later; not a sender (it keeps no queue open).
    pub fn waker(&self) -> QueueWaker {
        QueueWaker(Arc::clone(&self.0))
    }

    /// Items waiting for the writer.
    pub fn len(&self) -> usize {
        self.0.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// The writer is gone: nothing sent now will be read.
    pub fn is_closed(&self) -> bool {
        self.0.lock().reader_gone
    }
}

impl Clone for QueueSender {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(Arc::clone(&self.0))
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.0.reader.wake();
        }
    }
}

/// Wakes a queue's writer for items pushed with [`QueueSender::push_quietly`].
pub struct QueueWaker(Arc<Shared>);

impl QueueWaker {
    pub fn wake(&self) {
        self.0.reader.wake();
    }
}

pub struct QueueReceiver(Arc<Shared>);

impl QueueReceiver {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        poll_fn(|cx| {
            // Registered before looking, so a push after the look still wakes this task.
            self.0.reader.register(cx.waker());
            match self.try_recv() {
                Ok(item) => Poll::Ready(Some(item)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    pub fn try_recv(&mut self) -> Result<Outbound, TryRecvError> {
        let mut state = self.0.lock();
        match state.items.pop_front() {
            Some(item) => {
                if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
                    state.items = VecDeque::new();
                }
                Ok(item)
            }
            None if state.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl QueueReceiver {
    /// Refuses every later send and drops what is queued.
    pub fn close(&mut self) {
        let mut state = self.0.lock();
        state.reader_gone = true;
        state.items = VecDeque::new();
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    fn frame() -> Outbound {
        Outbound::Frame(protocol::pong_frame())
    }

    #[tokio::test]
    async fn holds_up_to_capacity_in_order_and_ends_when_the_senders_do() {
        let (tx, mut rx) = channel(2);
        tx.try_send(Outbound::Ping).unwrap();
        tx.try_send(frame()).unwrap();
        assert!(matches!(tx.try_send(frame()), Err(TrySendError::Full(_))));
        assert!(matches!(rx.recv().await, Some(Outbound::Ping)));
        assert!(matches!(rx.try_recv(), Ok(Outbound::Frame(_))));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        let other = tx.clone();
        drop(tx);
        other.try_send(Outbound::Ping).unwrap();
        drop(other);
        assert!(matches!(rx.recv().await, Some(Outbound::Ping)));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_send_from_another_thread_wakes_the_reader() {
        let (tx, mut rx) = channel(4);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            tx.try_send(Outbound::Ping).unwrap();
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(got, Ok(Some(Outbound::Ping))));
        sender.join().unwrap();
    }

    #[test]
    fn sends_fail_once_the_reader_is_gone() {
        let (tx, rx) = channel(4);
        drop(rx);
        assert!(matches!(
            tx.try_send(Outbound::Ping),
            Err(TrySendError::Closed(_))
        ));
    }
}
