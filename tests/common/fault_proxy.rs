//! A fault-injecting TCP proxy between a store client and its `redis-server`: it forwards bytes
//! both ways until told to reset every connection, to cut the connection at the client's next
//! command (the command is not delivered) or at every command for a while (the server is
//! unreachable), to swallow the server's replies, or to stall both directions. Usable by every layer's tests: connect the store to [`FaultProxy::url`].

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    task::{AbortHandle, JoinHandle},
};

#[derive(Default)]
struct State {
    /// Cut every connection when a client sends its next command (not delivered).
    reset_on_next_command: AtomicBool,
    /// Until then, every command cuts every connection (the server is unreachable).
    down_until: Mutex<Option<std::time::Instant>>,
    /// Discard what the server sends.
    swallow_replies: AtomicBool,
    /// Cut every connection when the server next sends something (a reply: not delivered).
    cut_next_reply: AtomicBool,
    /// Hold bytes in both directions.
    stalled: AtomicBool,
    /// The share (per million) of client commands that cut every connection and are lost.
    drop_ppm: AtomicU32,
    /// The pump tasks of the open connections.
    pumps: Mutex<Vec<AbortHandle>>,
    /// How many connections were cut.
    resets: AtomicUsize,
    /// How many server replies (chunks) were swallowed.
    swallowed: AtomicUsize,
}

impl State {
    fn reset_all(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        for pump in self.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }

    async fn while_stalled(&self) {
        while self.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A TCP proxy to `127.0.0.1:<upstream>` on a free loopback port. Stopped on drop.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        continue;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_rx, client_tx) = client.into_split();
                    let (server_rx, server_tx) = server.into_split();
                    let up = tokio::spawn(requests(state.clone(), client_rx, server_tx));
                    let down = tokio::spawn(replies(state.clone(), server_rx, client_tx));
                    let mut pumps = state.pumps.lock().unwrap();
                    pumps.push(up.abort_handle());
                    pumps.push(down.abort_handle());
                }
            }
        });
        Self {
            port,
            state,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts every open connection now (clients may connect again).
    pub fn reset(&self) {
        self.state.reset_all();
    }

    /// Cuts every connection when a client next sends a command; that command is lost.
    pub fn reset_on_next_command(&self) {
        self.state
            .reset_on_next_command
            .store(true, Ordering::SeqCst);
    }

    /// For `period`, every command a client sends cuts every connection and is lost: the server
    /// is unreachable, whatever the client retries on its own.
    pub fn down_for(&self, period: Duration) {
        *self.state.down_until.lock().unwrap() = Some(std::time::Instant::now() + period);
    }

    /// Cuts every connection when the server next replies to a client: the command ran on the
    /// server, its reply is lost.
    pub fn cut_next_reply(&self) {
        self.state.cut_next_reply.store(true, Ordering::SeqCst);
    }

    /// Forgets a [`cut_next_reply`](Self::cut_next_reply) that has not fired yet.
    pub fn disarm(&self) {
        self.state.cut_next_reply.store(false, Ordering::SeqCst);
        self.state
            .reset_on_next_command
            .store(false, Ordering::SeqCst);
    }

    /// Discards (`true`) or forwards (`false`) what the server sends. Replies swallowed in the
    /// middle of a connection leave the client's reply order broken: end it with [`reset`].
    pub fn swallow_replies(&self, on: bool) {
        self.state.swallow_replies.store(on, Ordering::SeqCst);
    }

    /// From now on, each command a client sends cuts every connection (and is lost) with
    /// probability `fraction` (0 turns this off): a lossy network that the clients' own
    /// reconnects and retries must get through.
    pub fn drop_fraction(&self, fraction: f64) {
        let ppm = (fraction.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.state.drop_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Holds (`true`) or releases (`false`) the bytes in both directions.
    pub fn stall(&self, on: bool) {
        self.state.stalled.store(on, Ordering::SeqCst);
    }

    /// How many times the connections were cut.
    pub fn resets(&self) -> usize {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// How many reads from the server were swallowed.
    pub fn swallowed(&self) -> usize {
        self.state.swallowed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for pump in self.state.pumps.lock().unwrap().drain(..) {
            pump.abort();
        }
    }
}

/// Client to server.
async fn requests(state: Arc<State>, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let down = state
            .down_until
            .lock()
            .unwrap()
            .is_some_and(|until| std::time::Instant::now() < until);
        let ppm = state.drop_ppm.load(Ordering::SeqCst);
        let dropped = ppm > 0 && rand::random_range(0..1_000_000) < ppm;
        if down || dropped || state.reset_on_next_command.swap(false, Ordering::SeqCst) {
            state.reset_all();
            return;
        }
        state.while_stalled().await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Server to client.
async fn replies(state: Arc<State>, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        state.while_stalled().await;
        if state.cut_next_reply.swap(false, Ordering::SeqCst) {
            state.reset_all();
            return;
        }
        if state.swallow_replies.load(Ordering::SeqCst) {
            state.swallowed.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
