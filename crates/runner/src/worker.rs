//! One Python worker process: spawned in its own process group with the protocol socket on fd 3,
//! killed with its whole group, and watched so that its death fails its in-flight calls at once.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use command_fds::{CommandFdExt, FdMapping};
use futures_util::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use agentry_core::executor::{CallError, Payload, RunItem};

use crate::protocol::{self, Hello, PyFailure, WorkerMessage};

/// Everything needed to start a worker for one agent.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The agent's name, for logs.
    pub agent: String,
    pub python: PathBuf,
    pub shim: PathBuf,
    pub agent_dir: PathBuf,
    /// JSON handed to the shim: the agent folder and its entrypoints.
    pub spec_json: String,
    /// Environment added to the server's own (the agent's `env_vars` and `.env`).
    pub env: Vec<(String, String)>,
    /// `RLIMIT_AS` for the worker, if any.
    pub memory_limit_bytes: Option<u64>,
    pub max_frame: usize,
    /// How long a worker may take to import the agent and say hello.
    pub start_timeout: Duration,
}

/// What a stream call receives, in order: chunks, then exactly one `End` or `Failed`.
#[derive(Debug)]
pub enum StreamItem {
    Chunk(Payload),
    End(u32),
    Failed(CallError),
}

enum Sink {
    Unary(oneshot::Sender<Result<Payload, CallError>>),
    Stream(mpsc::Sender<StreamItem>),
    Run(mpsc::UnboundedSender<RunItem>),
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {python}: {source}")]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("the worker exited before it was ready: {0}")]
    EarlyExit(String),
    #[error("the worker did not become ready within {0:?}")]
    StartTimeout(Duration),
    #[error("the worker speaks protocol {0}, this server speaks {1}")]
    Protocol(u32, u32),
    #[error("the worker broke the protocol: {0}")]
    BadHello(String),
}

/// A running worker.
/// Writes frames to the worker. A frame goes straight to the socket when nothing is queued (the
/// common case: no task hop, one syscall); when the socket is full, frames queue and one task
/// drains them, so callers never wait.
struct FrameWriter {
    socket: tokio::net::unix::OwnedWriteHalf,
    state: Mutex<WriteState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct WriteState {
    /// Bytes waiting for the drain task; while non-empty, only that task writes.
    backlog: BytesMut,
    closed: bool,
}

impl FrameWriter {
    fn send(&self, frame: &[u8]) -> Result<(), ()> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(());
        }
        if state.backlog.is_empty() {
            match self.socket.try_write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => state.backlog.extend_from_slice(&frame[n..]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    state.backlog.extend_from_slice(frame)
                }
                Err(_) => {
                    state.closed = true;
                    return Err(());
                }
            }
            drop(state);
            self.wake.notify_one();
        } else {
            state.backlog.extend_from_slice(frame);
        }
        Ok(())
    }

    /// Drains the backlog whenever the socket was full.
    async fn drain(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                if self.socket.writable().await.is_err() {
                    self.state.lock().closed = true;
                    return;
                }
                let mut state = self.state.lock();
                if state.closed {
                    return;
                }
                match self.socket.try_write(&state.backlog) {
                    Ok(n) => {
                        let _ = state.backlog.split_to(n);
                        if state.backlog.is_empty() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        state.closed = true;
                        return;
                    }
                }
            }
        }
    }
}

pub struct Worker {
    pub pid: i32,
    group: Arc<ProcessGroup>,
    pub hello: Hello,
    writer: Arc<FrameWriter>,
    calls: Mutex<HashMap<u32, Sink>>,
    /// Sync calls in the order the worker runs them (it runs them one after another).
    sync_order: Mutex<std::collections::VecDeque<u32>>,
    next_id: AtomicU32,
    dead: AtomicBool,
    /// Set once the worker is gone, with a sentence saying why.
    death: watch::Receiver<Option<String>>,
    /// Why we killed it, if we did (shown to the calls that die with it).
    kill_reason: Mutex<Option<String>>,
    pub started_at: Instant,
}

impl Worker {
    /// Starts a worker and waits for its hello. Import errors in the agent come back in
    /// `hello.errors`; the process has exited by then.
    pub async fn spawn(spec: &WorkerSpec) -> Result<Arc<Worker>, SpawnError> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| SpawnError::Spawn {
                python: spec.python.display().to_string(),
                source,
            })?;
        ours.set_nonblocking(true)
            .map_err(|source| SpawnError::Spawn {
                python: spec.python.display().to_string(),
                source,
            })?;
        let mut cmd = tokio::process::Command::new(&spec.python);
        // The server's own settings (`AGENTRY_*`: database URLs, keys, whatever else was
        // configured through the environment) are not the agent's business.
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"AGENTRY_") {
                cmd.env_remove(&name);
            }
        }
        cmd.arg(&spec.shim)
            .current_dir(&spec.agent_dir)
            .env("AGENTRY_FD", "3")
            .env("AGENTRY_PARENT_PID", std::process::id().to_string())
            .env("AGENTRY_SPEC", &spec.spec_json)
            .env("AGENTRY_MAX_FRAME", spec.max_frame.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: OwnedFd::from(theirs),
            child_fd: 3,
        }])
        .map_err(|e| SpawnError::Spawn {
            python: spec.python.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        crate::sys::set_child_limits(&mut cmd, spec.memory_limit_bytes);
        let spawned = cmd.spawn();
        // Dropping the command closes our copy of the worker's socket end, so that the worker's
        // death shows up as end-of-file on ours.
        drop(cmd);
        let mut child = spawned.map_err(|source| SpawnError::Spawn {
            python: spec.python.display().to_string(),
            source,
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        let log_target = spec.agent.clone();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, log_target.clone(), pid, "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, log_target.clone(), pid, "stderr"));
        }
        let group = Arc::new(ProcessGroup::new(pid));
        let (exit_tx, exit_rx) = watch::channel::<Option<String>>(None);
        {
            let group = Arc::clone(&group);
            tokio::spawn(async move {
                let status = group.reap(child).await;
                let _ = exit_tx.send(Some(status));
            });
        }

        let stream = UnixStream::from_std(ours).map_err(|source| SpawnError::Spawn {
            python: spec.python.display().to_string(),
            source,
        })?;
        let (read_half, write_half) = stream.into_split();
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(spec.max_frame)
            .new_codec();
        let mut frames = FramedRead::with_capacity(read_half, codec, 64 * 1024);

        let first = tokio::time::timeout(spec.start_timeout, frames.next()).await;
        let hello = match first {
            Err(_) => {
                group.kill();
                return Err(SpawnError::StartTimeout(spec.start_timeout));
            }
            Ok(None) | Ok(Some(Err(_))) => {
                group.kill();
                let why = wait_exit(exit_rx.clone(), Duration::from_secs(2)).await;
                return Err(SpawnError::EarlyExit(why));
            }
            Ok(Some(Ok(frame))) => match protocol::decode(frame.freeze()) {
                Ok(WorkerMessage::Hello(h)) => *h,
                Ok(other) => {
                    group.kill();
                    return Err(SpawnError::BadHello(format!(
                        "expected hello, got {other:?}"
                    )));
                }
                Err(e) => {
                    group.kill();
                    return Err(SpawnError::BadHello(e.to_string()));
                }
            },
        };
        if hello.protocol != protocol::PROTOCOL_VERSION {
            group.kill();
            return Err(SpawnError::Protocol(
                hello.protocol,
                protocol::PROTOCOL_VERSION,
            ));
        }

        let writer = Arc::new(FrameWriter {
            socket: write_half,
            state: Mutex::new(WriteState::default()),
            wake: tokio::sync::Notify::new(),
        });
        let (death_tx, death_rx) = watch::channel(None);
        let worker = Arc::new(Worker {
            pid,
            group: Arc::clone(&group),
            hello,
            writer: Arc::clone(&writer),
            calls: Mutex::new(HashMap::new()),
            sync_order: Mutex::new(std::collections::VecDeque::new()),
            next_id: AtomicU32::new(1),
            dead: AtomicBool::new(false),
            death: death_rx,
            kill_reason: Mutex::new(None),
            started_at: Instant::now(),
        });
        if !worker.hello.errors.is_empty() {
            // The shim closes the socket after reporting import errors; nothing to run.
            worker.dead.store(true, Ordering::SeqCst);
            return Ok(worker);
        }
        tokio::spawn(writer.drain());
        tokio::spawn(read_frames(Arc::clone(&worker), frames, exit_rx, death_tx));
        Ok(worker)
    }

    /// Whether the worker is gone (or never ran because its imports failed).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Resolves when the worker is gone, with the reason.
    pub async fn wait_dead(&self) -> String {
        let mut rx = self.death.clone();
        loop {
            if let Some(reason) = rx.borrow().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "the worker's supervisor stopped".into();
            }
        }
    }

    /// Sends a unary call; the receiver resolves with its result.
    pub fn start_unary(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        sync: bool,
    ) -> Result<(u32, oneshot::Receiver<Result<Payload, CallError>>), CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Sink::Unary(tx))?;
        if sync {
            self.sync_order.lock().push_back(id);
        }
        self.send(protocol::encode_call(id, tag, args, kwargs, 0, None), id)?;
        Ok((id, rx))
    }

    /// Sends the call of a durable run. `run` is its context's JSON; `window` its stream
    /// credit (streams only); `sync` whether it joins the worker's run order.
    pub fn start_run(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        window: u32,
        run: &str,
        sync: bool,
    ) -> Result<(u32, mpsc::UnboundedReceiver<RunItem>), CallError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.register(Sink::Run(tx))?;
        if sync {
            self.sync_order.lock().push_back(id);
        }
        self.send(
            protocol::encode_call(id, tag, args, kwargs, window, Some(run)),
            id,
        )?;
        Ok((id, rx))
    }

    /// Answers a checkpoint: the agent goes on (and learns whether it was saved).
    pub fn ack(&self, id: u32, saved: bool) {
        let _ = self.writer.send(&protocol::encode_ack(id, saved));
    }

    /// Sends a streaming call with a window of `window` unacknowledged chunks.
    pub fn start_stream(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        initial_credit: u32,
        max_window: u32,
    ) -> Result<(u32, mpsc::Receiver<StreamItem>), CallError> {
        // Room for the largest window plus the terminal item: the worker never exceeds it.
        let (tx, rx) = mpsc::channel(max_window as usize + 2);
        let id = self.register(Sink::Stream(tx))?;
        self.send(
            protocol::encode_call(id, tag, args, kwargs, initial_credit, None),
            id,
        )?;
        Ok((id, rx))
    }

    fn register(&self, sink: Sink) -> Result<u32, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut calls = self.calls.lock();
        if self.is_dead() {
            return Err(CallError::Crashed(self.death_reason()));
        }
        calls.insert(id, sink);
        Ok(id)
    }

    fn send(&self, frame: Bytes, id: u32) -> Result<(), CallError> {
        if self.writer.send(&frame).is_err() {
            self.calls.lock().remove(&id);
            return Err(CallError::Crashed(self.death_reason()));
        }
        Ok(())
    }

    /// Grants a stream `n` more chunks.
    pub fn grant(&self, id: u32, n: u32) {
        let _ = self.writer.send(&protocol::encode_credit(id, n));
    }

    /// Asks the worker to stop a call. The call's sink stays registered: its answer (a
    /// cancelled failure, or the result if it raced) still arrives.
    pub fn cancel(&self, id: u32) {
        let _ = self.writer.send(&protocol::encode_cancel(id));
    }

    /// Whether the call is still running in the worker.
    pub fn has_call(&self, id: u32) -> bool {
        self.calls.lock().contains_key(&id)
    }

    /// Forgets a call whose caller no longer waits (its answer, if any, is dropped). A sync call
    /// stays in the run order until the worker answers it: it may still be running.
    pub fn forget(&self, id: u32) {
        self.calls.lock().remove(&id);
    }

    /// Whether `id` is the sync call the worker is running now (the oldest unanswered one).
    pub fn is_running_first(&self, id: u32) -> bool {
        self.sync_order.lock().front() == Some(&id)
    }

    fn answered(&self, id: u32) {
        let mut order = self.sync_order.lock();
        if let Some(pos) = order.iter().position(|x| *x == id) {
            order.remove(pos);
        }
    }

    /// Kills the worker's whole process group. In-flight calls fail with `reason`.
    pub fn kill(&self, reason: impl Into<String>) {
        self.kill_reason.lock().get_or_insert_with(|| reason.into());
        // Dead from now on: the pool must not route another call to it while the process exits.
        self.dead.store(true, Ordering::SeqCst);
        self.group.kill();
    }

    /// Closes the protocol socket: an idle worker exits on its own when it sees end-of-file.
    pub fn close(&self) {
        let _ = self.writer.send(&protocol::encode_quit());
    }

    fn death_reason(&self) -> String {
        self.death
            .borrow()
            .clone()
            .unwrap_or_else(|| "the worker is shutting down".into())
    }

    fn dispatch(&self, msg: WorkerMessage) -> Result<(), String> {
        match msg {
            WorkerMessage::Result { id, payload } => {
                self.answered(id);
                match self.calls.lock().remove(&id) {
                    Some(Sink::Unary(tx)) => {
                        let _ = tx.send(Ok(payload));
                    }
                    Some(Sink::Run(tx)) => {
                        let _ = tx.send(RunItem::Result(payload));
                    }
                    _ => {}
                }
            }
            WorkerMessage::Failure { id, failure } => {
                self.answered(id);
                let err = failure_to_error(failure);
                match self.calls.lock().remove(&id) {
                    Some(Sink::Unary(tx)) => {
                        let _ = tx.send(Err(err));
                    }
                    Some(Sink::Stream(tx)) => {
                        let _ = tx.try_send(StreamItem::Failed(err));
                    }
                    Some(Sink::Run(tx)) => {
                        let _ = tx.send(RunItem::Failed(err));
                    }
                    None => {}
                }
            }
            WorkerMessage::Chunk { id, payload } => {
                let calls = self.calls.lock();
                match calls.get(&id) {
                    Some(Sink::Stream(tx)) => {
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            tx.try_send(StreamItem::Chunk(payload))
                        {
                            return Err(format!(
                                "call {id} sent more chunks than its window allows"
                            ));
                        }
                    }
                    Some(Sink::Run(tx)) => {
                        let _ = tx.send(RunItem::Chunk(payload));
                    }
                    _ => {}
                }
            }
            WorkerMessage::End { id, count } => match self.calls.lock().remove(&id) {
                Some(Sink::Stream(tx)) => {
                    let _ = tx.try_send(StreamItem::End(count));
                }
                Some(Sink::Run(tx)) => {
                    let _ = tx.send(RunItem::End(count));
                }
                _ => {}
            },
            WorkerMessage::Emit { id, kind, data } => {
                if let Some(Sink::Run(tx)) = self.calls.lock().get(&id) {
                    let _ = tx.send(RunItem::Event { kind, data });
                }
            }
            WorkerMessage::Log { id, level, message } => {
                if let Some(Sink::Run(tx)) = self.calls.lock().get(&id) {
                    let _ = tx.send(RunItem::Log { level, message });
                }
            }
            WorkerMessage::Checkpoint { id, state } => {
                let calls = self.calls.lock();
                match calls.get(&id) {
                    Some(Sink::Run(tx)) => {
                        let _ = tx.send(RunItem::Checkpoint(state));
                    }
                    // Not a durable run (or no longer awaited): nothing to save, go on.
                    _ => self.ack(id, false),
                }
            }
            WorkerMessage::Hello(_) => return Err("a second hello".into()),
        }
        Ok(())
    }

    fn fail_all(&self, reason: &str) {
        let calls: Vec<Sink> = {
            let mut map = self.calls.lock();
            self.dead.store(true, Ordering::SeqCst);
            map.drain().map(|(_, s)| s).collect()
        };
        for sink in calls {
            let err = CallError::Crashed(reason.to_string());
            match sink {
                Sink::Unary(tx) => {
                    let _ = tx.send(Err(err));
                }
                Sink::Stream(tx) => {
                    let _ = tx.try_send(StreamItem::Failed(err));
                }
                Sink::Run(tx) => {
                    let _ = tx.send(RunItem::Failed(err));
                }
            }
        }
    }
}

fn failure_to_error(f: PyFailure) -> CallError {
    if f.cancelled {
        CallError::Cancelled
    } else {
        CallError::Agent {
            exc_type: f.r#type,
            message: f.message,
            traceback: f.traceback,
            retriable: f.retriable,
        }
    }
}

async fn read_frames(
    worker: Arc<Worker>,
    mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, LengthDelimitedCodec>,
    exit: watch::Receiver<Option<String>>,
    death: watch::Sender<Option<String>>,
) {
    let broke = loop {
        match frames.next().await {
            Some(Ok(frame)) => match protocol::decode(frame.freeze()) {
                Ok(msg) => {
                    if let Err(why) = worker.dispatch(msg) {
                        break Some(why);
                    }
                }
                Err(e) => break Some(e.to_string()),
            },
            Some(Err(e)) => break Some(format!("unreadable frame: {e}")),
            None => break None,
        }
    };
    if let Some(why) = &broke {
        tracing::error!(
            worker.pid = worker.pid,
            "worker broke the protocol ({why}); killing it"
        );
        worker.kill(format!("the worker broke the protocol: {why}"));
    }
    // The socket is closed: the process is gone or going. Say how it ended.
    let exit_status = wait_exit(exit, Duration::from_secs(2)).await;
    let reason = match worker.kill_reason.lock().clone() {
        Some(kill) => kill,
        None => format!("the worker process {exit_status}"),
    };
    worker.group.kill(); // grandchildren the agent left behind go with it
    worker.fail_all(&reason);
    let _ = death.send(Some(reason));
}

async fn wait_exit(mut rx: watch::Receiver<Option<String>>, limit: Duration) -> String {
    let waited = tokio::time::timeout(limit, async {
        loop {
            if let Some(s) = rx.borrow().clone() {
                return s;
            }
            if rx.changed().await.is_err() {
                return "ended".to_string();
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| "closed its protocol socket".to_string())
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        let hint = match sig {
            9 => " (killed: out of memory, a deadline, or an operator)",
            11 => " (segmentation fault)",
            6 => " (aborted)",
            _ => "",
        };
        format!("was killed by signal {sig} ({name}){hint}")
    } else {
        format!("exited with code {}", status.code().unwrap_or(-1))
    }
}

/// A worker's process group (the worker leads it, so its id is the worker's pid), signalled
/// only while the worker is not yet reaped. Until it is reaped, the kernel gives its number to
/// no other process or group, so a kill never reaches a stranger that inherited the number,
/// however late it comes (a deadline firing as the worker exits, a pool shutting down). The
/// worker's exit is seen on a pidfd, which fires before the reap; the reap waits for the lock
/// that every kill holds.
pub(crate) struct ProcessGroup {
    pid: i32,
    /// Readable once the worker has exited. `None` where pidfds are missing (Linux before
    /// 5.3): then the exit is seen by reaping, and a kill racing that reap is not fenced.
    pidfd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    reaped: Mutex<bool>,
}

impl ProcessGroup {
    fn new(pid: i32) -> ProcessGroup {
        let pidfd = crate::sys::exit_watch(pid);
        if pidfd.is_none() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "no pidfds on this kernel (Linux 5.3+): a kill that races a worker's exit is not fenced against PID reuse"
                );
            });
        }
        ProcessGroup {
            pid,
            pidfd,
            reaped: Mutex::new(false),
        }
    }

    /// SIGKILLs the whole group, unless the worker is reaped already.
    pub(crate) fn kill(&self) {
        let reaped = self.reaped.lock();
        if !*reaped && self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }

    /// Waits for the worker to exit, kills what it left in its group, fences later kills, and
    /// reaps it. Says how it ended.
    async fn reap(&self, mut child: tokio::process::Child) -> String {
        let seen = self.exited().await;
        if seen {
            // What the agent left running goes now, while the group's number is ours.
            self.reaping(true);
        }
        let status = match child.wait().await {
            Ok(s) => describe_exit(s),
            Err(e) => format!("could not be waited for: {e}"),
        };
        if !seen {
            self.reaping(false);
        }
        status
    }

    /// Resolves once the worker has exited, before it is reaped; `false` at once when there
    /// is no pidfd to watch.
    async fn exited(&self) -> bool {
        match &self.pidfd {
            // A pidfd polls readable when its process exits, and stays so.
            Some(fd) => fd.readable().await.is_ok(),
            None => false,
        }
    }

    /// With the exit seen before the reap (`seen`): kills what is left of the group and fences
    /// every later kill; the caller reaps next. Without a pidfd the worker is reaped already and
    /// nothing is fenced: the group kill that follows a worker's death must still reach what
    /// the agent left behind, at the (tiny) risk that the number was reused in between.
    fn reaping(&self, seen: bool) {
        if !seen {
            return;
        }
        let mut reaped = self.reaped.lock();
        if !*reaped && self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        *reaped = true;
    }
}

/// The most of one line of an agent's output that reaches the log.
const MAX_LOG_LINE: usize = 16 * 1024;

async fn forward_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    agent: String,
    pid: i32,
    which: &'static str,
) {
    let mut reader = BufReader::new(stream);
    let mut lines = CappedLines::default();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let taken = chunk.len();
        lines.feed(chunk, |line, truncated| {
            let line = String::from_utf8_lossy(line);
            let line = line.trim_end_matches(['\n', '\r']);
            let more = if truncated { " …(line cut at 16 KiB)" } else { "" };
            tracing::info!(target: "agentry::agent", agent = %agent, pid, output = which, "{line}{more}");
        });
        reader.consume(taken);
    }
    lines.finish(|line, truncated| {
        let line = String::from_utf8_lossy(line);
        let more = if truncated { " …(line cut at 16 KiB)" } else { "" };
        tracing::info!(target: "agentry::agent", agent = %agent, pid, output = which, "{line}{more}");
    });
}

/// Splits output into lines of at most `MAX_LOG_LINE` bytes without ever holding more. A longer
/// line is logged as soon as it reaches the cap and its rest is skipped up to its newline, so
/// an agent printing megabytes without one costs the server 16 KiB, not megabytes.
#[derive(Default)]
struct CappedLines {
    line: Vec<u8>,
    /// The current line was cut and logged; the rest of it, up to its newline, is dropped.
    skipping: bool,
}

impl CappedLines {
    fn feed(&mut self, mut chunk: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while !chunk.is_empty() {
            let (part, rest, ended) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..=i], &chunk[i + 1..], true),
                None => (chunk, &chunk[chunk.len()..], false),
            };
            if !self.skipping {
                let room = MAX_LOG_LINE - self.line.len();
                if part.len() > room {
                    self.line.extend_from_slice(&part[..room]);
                    emit(&self.line, true);
                    self.line.clear();
                    self.skipping = true;
                } else {
                    self.line.extend_from_slice(part);
                    if ended {
                        emit(&self.line, false);
                        self.line.clear();
                    }
                }
            }
            if ended {
                self.skipping = false;
            }
            chunk = rest;
        }
    }

    fn finish(self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() {
            emit(&self.line, false);
        }
    }
}

#[cfg(test)]
mod process_group_tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
    }

    fn leader(cmd: &str) -> tokio::process::Child {
        tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh")
    }

    /// Once a worker is reaped, its number may be given to another process group. A kill that
    /// comes late (a deadline firing as the worker exits) must not reach that group. The reuse
    /// is staged: a live group stands in for the one that inherited the number.
    #[tokio::test]
    async fn a_kill_after_the_reap_never_reaches_whoever_inherited_the_number() {
        let mut stranger = leader("sleep 30");
        let stranger_pid = stranger.id().expect("pid") as i32;
        let worker = leader("exit 0");
        let group = ProcessGroup::new(worker.id().expect("pid") as i32);
        let ended = group.reap(worker).await;
        assert_eq!(ended, "exited with code 0");
        // The worker's number, now reused by the stranger's group.
        let late = ProcessGroup {
            pid: stranger_pid,
            pidfd: None,
            reaped: Mutex::new(*group.reaped.lock()),
        };
        late.kill();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(alive(stranger_pid), "the late kill reached the stranger");
        // The same kill before the reap does reach its group.
        let live = ProcessGroup::new(stranger_pid);
        live.kill();
        let status = stranger.wait().await.expect("wait");
        assert!(describe_exit(status).contains("signal 9"), "{status:?}");
    }

    /// The exit is seen on the pidfd before the reap, so what the worker left running in its
    /// group is killed while the group's number is still the worker's.
    #[tokio::test]
    async fn what_a_worker_leaves_in_its_group_dies_before_it_is_reaped() {
        let dir = tempfile::tempdir().expect("tmp");
        let note = dir.path().join("pid");
        let worker = leader(&format!("sleep 30 & echo $! > {}; exit 3", note.display()));
        let group = ProcessGroup::new(worker.id().expect("pid") as i32);
        assert!(group.pidfd.is_some(), "this kernel has pidfds");
        let ended = group.reap(worker).await;
        assert_eq!(ended, "exited with code 3");
        assert!(*group.reaped.lock());
        let left: i32 = std::fs::read_to_string(&note)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // Killed: gone, or a zombie until whoever inherited it reaps it.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{left}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
                .flatten();
            if matches!(state, None | Some('Z')) {
                break;
            }
            assert!(
                Instant::now() < end,
                "what the worker left runs on ({state:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod capped_lines_tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        let mut lines = CappedLines::default();
        for c in chunks {
            lines.feed(c, |l, t| out.push((l.len(), t)));
        }
        lines.finish(|l, t| out.push((l.len(), t)));
        out
    }

    #[test]
    fn long_lines_are_cut_at_the_cap_and_never_buffered_beyond_it() {
        let big = vec![b'x'; 5 * MAX_LOG_LINE];
        // Megabytes without a newline, in pieces: one capped line, then the next line intact.
        let out = run(&[&big, &big, b"tail\nnext\n"]);
        assert_eq!(out, [(MAX_LOG_LINE, true), (5, false)]);
        // Short lines split across chunks, and a last line without a newline.
        assert_eq!(run(&[b"ab", b"c\nde", b"f"]), [(4, false), (3, false)]);
    }
}
