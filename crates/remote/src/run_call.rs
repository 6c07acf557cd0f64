//! A durable run's call (`RunCall`) over a remote call: a unary call ends with its result, a
//! stream sends its chunks then its end. The call runs on a task of its own; cancelling or
//! dropping the run aborts it, which closes the connection (the remote side sees the client
//! go). Remote agents cannot checkpoint, log or emit through this protocol, so those items
//! never come.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use agentry_core::executor::{CallError, ChunkStream, Payload, RunCall, RunItem};
use tokio::task::JoinHandle;

enum State {
    Unary(JoinHandle<Result<Payload, CallError>>),
    /// With what stops its reader: a cancel ends the stream as cancelled.
    Stream(Box<dyn ChunkStream>, Option<tokio::task::AbortHandle>),
    Done,
}

pub(crate) struct RemoteRun {
    state: State,
    chunks: u32,
}

impl RemoteRun {
    pub(crate) fn unary(
        call: impl Future<Output = Result<Payload, CallError>> + Send + 'static,
    ) -> Self {
        Self {
            state: State::Unary(tokio::spawn(call)),
            chunks: 0,
        }
    }

    pub(crate) fn stream(
        stream: Box<dyn ChunkStream>,
        abort: Option<tokio::task::AbortHandle>,
    ) -> Self {
        Self {
            state: State::Stream(stream, abort),
            chunks: 0,
        }
    }

    fn stop(&mut self) {
        if let State::Unary(task) = &self.state {
            task.abort();
        }
        if matches!(self.state, State::Stream(..)) {
            // Dropping a stream cancels its call.
            self.state = State::Done;
        }
    }
}

impl RunCall for RemoteRun {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<RunItem>> {
        let item = match &mut self.state {
            State::Done => return Poll::Ready(None),
            State::Unary(task) => match Pin::new(task).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(payload))) => RunItem::Result(payload),
                Poll::Ready(Ok(Err(e))) => RunItem::Failed(e),
                Poll::Ready(Err(_)) => RunItem::Failed(CallError::Cancelled),
            },
            State::Stream(stream, _) => match stream.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    self.chunks += 1;
                    return Poll::Ready(Some(RunItem::Chunk(chunk)));
                }
                Poll::Ready(Some(Err(e))) => RunItem::Failed(e),
                Poll::Ready(None) => RunItem::End(stream.total().unwrap_or(self.chunks)),
            },
        };
        self.state = State::Done;
        Poll::Ready(Some(item))
    }

    fn ack(&self, _saved: bool) {}

    fn cancel(&self) {
        match &self.state {
            State::Unary(task) => task.abort(),
            State::Stream(_, Some(abort)) => abort.abort(),
            _ => {}
        }
    }

    fn kill(&mut self, _reason: &str) {
        self.stop();
    }
}

impl Drop for RemoteRun {
    fn drop(&mut self) {
        self.stop();
    }
}
