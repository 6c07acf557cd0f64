//! Group commit for PostgreSQL: the hot writes and reads (a run's creation, an attempt's end,
//! a run read by id) are gathered from every task that asks at once and sent as one statement
//! over arrays, so that N callers pay one round trip, one executor start and one commit
//! instead of N. When nothing else is waiting, a request goes out alone at once: batching adds
//! no latency to an idle node, it only forms while earlier batches are in flight.
//!
//! Hand-written because it is the store's own hot path: a request is a plain value and its
//! answer comes back on a oneshot; at most `in_flight` batches are on the wire at a time, so
//! under load callers queue here (where they merge) rather than in the connection pool.

use std::future::Future;
use std::sync::Arc;

use agentry_core::store::StoreError;
use tokio::sync::{Semaphore, mpsc, oneshot};

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// Sends requests of type `Q` in batches through `run` and hands each caller its answer.
pub(crate) struct Batcher<Q, R> {
    tx: mpsc::UnboundedSender<(Q, Reply<R>)>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<Q: Send + 'static, R: Send + 'static> Batcher<Q, R> {
    /// `run` gets up to `max` requests and answers each, in the order given (a whole-batch
    /// error is every caller's error).
    pub(crate) fn start<F, Fut>(max: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Q, Reply<R>)>();
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(max);
            loop {
                // Take a slot first: while every slot is busy, requests pile up in the channel
                // and leave together.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                if rx.recv_many(&mut pending, max).await == 0 {
                    return;
                }
                let (requests, replies): (Vec<Q>, Vec<Reply<R>>) = pending.drain(..).unzip();
                let run = Arc::clone(&run);
                tokio::spawn(async move {
                    match run(requests).await {
                        Ok(answers) => {
                            let mut answers = answers.into_iter();
                            for reply in replies {
                                let answer = answers.next().unwrap_or_else(|| {
                                    Err(StoreError::Internal("a batch lost an answer".into()))
                                });
                                let _ = reply.send(answer);
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Queues `request` for the next batch and waits for its answer.
    pub(crate) async fn call(&self, request: Q) -> Result<R, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((request, reply))
            .map_err(|_| StoreError::Unavailable("the run store is shutting down".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("a batch was dropped unanswered".into()))?
    }
}
