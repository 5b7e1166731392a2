//! Bounded resources: how many connections, for how long, how many calls
//! and audit records, and the counting of refused calls so that a flood
//! of them adds a few rows to the activity log, not one per call.
//!
//! Connections are counted from the TCP accept, before TLS: at most
//! [`Limits::max_connections_per_client`] per client address (an IPv6
//! client by its /64) and [`Limits::max_connections`] in all. When the
//! total is reached, the connection idle the longest is closed to make
//! room (an agent's check-in gets in while idle floods wait), and only when
//! every connection is busy is the new one refused. A connection with no
//! request in flight (its response body included) for
//! [`Limits::idle_timeout`] is closed, whatever the protocol: a TLS
//! handshake never finished, an HTTP/1 keep-alive, an HTTP/2 connection.

use std::collections::HashMap;
use std::future::{Future, Ready};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::http::{Request, Response};
use axum_server::accept::Accept;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use jiff::Timestamp;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::db::{Db, RefusedKey};

/// The platform's limits; [`Limits::default`] is what `serve` uses unless
/// told otherwise.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64).
    pub max_connections_per_client: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Calls per second from one client address (bursts of twice that);
    /// 0: no limit.
    pub calls_per_second_per_client: u32,
    /// Calls per second by one agent or admin (bursts of six times that);
    /// 0: no limit.
    pub calls_per_second_per_identity: u32,
    /// Audit records one agent may upload per hour (also the largest
    /// burst).
    pub audit_records_per_hour: u32,
    /// Audit bytes one agent may upload per hour, in MiB.
    pub audit_mib_per_hour: u32,
    /// Offline challenges one admin may answer per hour.
    pub offline_codes_per_hour: u32,
    /// How far ahead a requested window may start.
    pub max_window_lead: Duration,
    /// A console session unused this long ends.
    pub session_idle: Duration,
    /// A console session ends this long after sign-in.
    pub session_lifetime: Duration,
    /// Failed console sign-ins one account may have per
    /// [`Limits::sign_in_window`] before it is locked for the rest of it
    /// (0: no limit).
    pub sign_in_failures_per_account: u32,
    /// Failed console sign-ins from one address per window (0: no limit).
    pub sign_in_failures_per_address: u32,
    /// The window failed sign-ins are counted in.
    pub sign_in_window: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            max_connections_per_client: 256,
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            calls_per_second_per_client: 100,
            calls_per_second_per_identity: 20,
            audit_records_per_hour: 100_000,
            audit_mib_per_hour: 256,
            offline_codes_per_hour: 30,
            max_window_lead: Duration::from_secs(30 * 86_400),
            session_idle: Duration::from_secs(30 * 60),
            session_lifetime: Duration::from_secs(12 * 3600),
            sign_in_failures_per_account: 5,
            sign_in_failures_per_address: 20,
            sign_in_window: Duration::from_secs(15 * 60),
        }
    }
}

/// A keyed rate limiter, or none when its rate is 0.
#[derive(Debug)]
pub struct Rate<K: std::hash::Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Rate<K> {
    /// `quota`, or no limit.
    pub fn new(quota: Option<Quota>) -> Rate<K> {
        Rate {
            limiter: quota.map(DefaultKeyedRateLimiter::keyed),
        }
    }

    /// `rate` per second with bursts of `burst` times that; 0: no limit.
    pub fn per_second(rate: u32, burst: u32) -> Rate<K> {
        Rate::new(NonZeroU32::new(rate).map(|per_second| {
            let burst = NonZeroU32::new(rate.saturating_mul(burst)).unwrap_or(per_second);
            Quota::per_second(per_second).allow_burst(burst)
        }))
    }

    /// Per hour, the whole hour's allowance available at once.
    pub fn per_hour(amount: u32) -> Rate<K> {
        Rate::new(NonZeroU32::new(amount).map(Quota::per_hour))
    }

    /// Takes `n` cells for `key`: `Ok`, or how long until they would fit
    /// (`None`: never, `n` is over the whole allowance).
    pub fn take(&self, key: &K, n: u32) -> Result<(), Option<Duration>> {
        let (Some(limiter), Some(n)) = (&self.limiter, NonZeroU32::new(n)) else {
            return Ok(());
        };
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(_) => Err(None),
        }
    }

    /// Forgets keys whose allowance is full again (bounds memory).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The rate limits and quotas, built from [`Limits`].
#[derive(Debug)]
pub struct Rates {
    /// Calls per client address.
    pub client: Rate<IpAddr>,
    /// Calls per agent (`agent:ID`) or admin (`admin:NAME`).
    pub identity: Rate<String>,
    /// Audit records per agent id.
    pub audit_records: Rate<String>,
    /// Audit KiB per agent id.
    pub audit_kib: Rate<String>,
    /// Offline codes per admin name.
    pub offline_codes: Rate<String>,
}

impl Rates {
    /// From the configured limits.
    pub fn new(limits: &Limits) -> Rates {
        Rates {
            client: Rate::per_second(limits.calls_per_second_per_client, 2),
            identity: Rate::per_second(limits.calls_per_second_per_identity, 6),
            audit_records: Rate::per_hour(limits.audit_records_per_hour),
            audit_kib: Rate::per_hour(limits.audit_mib_per_hour.saturating_mul(1024)),
            offline_codes: Rate::per_hour(limits.offline_codes_per_hour),
        }
    }

    /// Forgets every key whose allowance is full again.
    pub fn forget_idle(&self) {
        self.client.forget_idle();
        self.identity.forget_idle();
        self.audit_records.forget_idle();
        self.audit_kib.forget_idle();
        self.offline_codes.forget_idle();
    }
}

/// A client's address as the limits count it: IPv4 as is, IPv6 by its /64
/// (one host usually has a whole /64), IPv4-mapped IPv6 as IPv4.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- refused calls --------------------------------------------------

/// Distinct keys counted between two flushes; past it, calls are counted
/// under one catch-all key so memory and rows stay bounded.
const MAX_REFUSED_KEYS: usize = 512;
/// Bytes of the path kept.
const MAX_CALL_PATH: usize = 80;

/// `METHOD path` for the activity log: the path cut to `max` bytes (with
/// `…`) and made inert ([`epm_api::validate::printable`]).
pub fn call_text(method: &str, path: &str, max: usize) -> String {
    let mut end = path.len().min(max);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{method} {}{}",
        epm_api::validate::printable(&path[..end]),
        if end < path.len() { "…" } else { "" }
    )
}

/// Counts refused calls in memory; [`RefusedLog::flush`] writes them to
/// the activity log, one row per key and hour.
#[derive(Debug, Default)]
pub struct RefusedLog {
    counts: Mutex<HashMap<RefusedKey, (u64, Timestamp)>>,
}

impl RefusedLog {
    /// Counts one refused call.
    pub fn note(&self, source: Option<IpAddr>, who: &str, method: &str, path: &str, status: u16) {
        let now = Timestamp::now();
        let hour = Timestamp::from_second(now.as_second() - now.as_second().rem_euclid(3600))
            .unwrap_or(now);
        let mut key = RefusedKey {
            hour: format!("{hour:.9}"),
            source: source.map_or_else(|| "unknown".to_owned(), |ip| client_of(ip).to_string()),
            who: epm_api::validate::printable(who).into_owned(),
            call: call_text(method, path, MAX_CALL_PATH),
            status,
        };
        let mut counts = lock(&self.counts);
        if counts.len() >= MAX_REFUSED_KEYS && !counts.contains_key(&key) {
            key.source = "*".into();
            key.who = "*".into();
            key.call = "(more distinct calls than counted separately)".into();
        }
        let entry = counts.entry(key).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now;
    }

    /// Writes what was counted since the last flush.
    pub fn flush(&self, db: &Db) {
        let counts: Vec<(RefusedKey, u64, Timestamp)> = lock(&self.counts)
            .drain()
            .map(|(key, (count, last))| (key, count, last))
            .collect();
        if counts.is_empty() {
            return;
        }
        if let Err(e) = db.record_refused(&counts) {
            tracing::error!("cannot record {} refused-call counts: {e}", counts.len());
        }
    }
}

// ---- connections ----------------------------------------------------

/// One open connection, shared by its stream and its service.
#[derive(Debug)]
struct Conn {
    id: u64,
    client: IpAddr,
    /// The gate's start: `idle_since` counts from it.
    origin: Instant,
    /// Requests in flight, response bodies included.
    busy: AtomicUsize,
    /// When it last became idle, in ms since the gate started.
    idle_since: AtomicU64,
    closing: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Conn {
    /// Marks the connection closing; `true` for the one caller that did.
    fn begin_close(&self) -> bool {
        self.closing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn wake(&self) {
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why connections were refused or closed, counted for the log.
#[derive(Debug, Default)]
struct Tally {
    over_client: u64,
    full: u64,
    evicted: u64,
    idle_closed: u64,
    clients: HashMap<IpAddr, u64>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
    closing: usize,
    per_client: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct GateState {
    max_connections: usize,
    max_per_client: usize,
    idle_timeout: Duration,
    started: Instant,
    registry: Mutex<Registry>,
    tally: Mutex<Tally>,
}

impl GateState {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> io::Result<Arc<Conn>> {
        let client = client_of(peer);
        let mut registry = lock(&self.registry);
        let from_client = registry.per_client.get(&client).copied().unwrap_or(0);
        if from_client >= self.max_per_client {
            drop(registry);
            self.count(client, |t| t.over_client += 1);
            return Err(io::Error::other("over the per-client connection cap"));
        }
        let live = registry.open.len() - registry.closing;
        // Connections being closed still hold a descriptor for a moment:
        // never more than an eighth over the cap in all.
        let ceiling = self.max_connections + self.max_connections / 8;
        if live >= self.max_connections || registry.open.len() >= ceiling {
            let victim = (registry.open.len() < ceiling)
                .then(|| {
                    registry
                        .open
                        .values()
                        .filter(|c| {
                            c.busy.load(Ordering::SeqCst) == 0 && !c.closing.load(Ordering::SeqCst)
                        })
                        .min_by_key(|c| c.idle_since.load(Ordering::SeqCst))
                        .cloned()
                })
                .flatten();
            match victim {
                Some(victim) if victim.begin_close() => {
                    registry.closing += 1;
                    victim.wake();
                    drop(registry);
                    self.count(victim.client, |t| t.evicted += 1);
                    registry = lock(&self.registry);
                }
                _ => {
                    drop(registry);
                    self.count(client, |t| t.full += 1);
                    return Err(io::Error::other(
                        "at the connection cap, every connection busy",
                    ));
                }
            }
        }
        registry.next_id += 1;
        let conn = Arc::new(Conn {
            id: registry.next_id,
            client,
            origin: self.started,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(
                u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ),
            closing: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        registry.open.insert(conn.id, conn.clone());
        *registry.per_client.entry(client).or_insert(0) += 1;
        Ok(conn)
    }

    fn release(&self, conn: &Conn) {
        let mut registry = lock(&self.registry);
        if registry.open.remove(&conn.id).is_none() {
            return;
        }
        if conn.closing.load(Ordering::SeqCst) {
            registry.closing = registry.closing.saturating_sub(1);
        }
        if let Some(count) = registry.per_client.get_mut(&conn.client) {
            *count -= 1;
            if *count == 0 {
                registry.per_client.remove(&conn.client);
            }
        }
    }

    fn count(&self, client: IpAddr, what: impl FnOnce(&mut Tally)) {
        let mut tally = lock(&self.tally);
        what(&mut tally);
        if tally.clients.len() < 8 || tally.clients.contains_key(&client) {
            *tally.clients.entry(client).or_insert(0) += 1;
        }
    }

    /// Logs what was refused or closed since the last report, if anything.
    fn report(&self) {
        let tally = std::mem::take(&mut *lock(&self.tally));
        if tally.over_client + tally.full + tally.evicted == 0 {
            if tally.idle_closed > 0 {
                tracing::debug!(closed = tally.idle_closed, "idle connections closed");
            }
            return;
        }
        let mut clients: Vec<(IpAddr, u64)> = tally.clients.into_iter().collect();
        clients.sort_by_key(|c| std::cmp::Reverse(c.1));
        let clients: Vec<String> = clients
            .iter()
            .map(|(ip, n)| format!("{ip} ({n})"))
            .collect();
        let open = lock(&self.registry).open.len();
        tracing::warn!(
            "connections refused: {} over the per-client cap of {}, {} with all {} busy; {} idle closed to make room, {} idle timed out; {open} open; clients: {}",
            tally.over_client,
            self.max_per_client,
            tally.full,
            self.max_connections,
            tally.evicted,
            tally.idle_closed,
            clients.join(", ")
        );
    }
}

/// The acceptor that counts, caps and times out connections. It runs on
/// the TCP stream, under TLS (see [`axum_server::tls_rustls::RustlsAcceptor::acceptor`]).
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    state: Arc<GateState>,
}

impl ConnectionGate {
    /// A gate with `limits`' caps and idle timeout.
    pub fn new(limits: &Limits) -> ConnectionGate {
        ConnectionGate {
            state: Arc::new(GateState {
                max_connections: limits.max_connections.max(1),
                max_per_client: limits.max_connections_per_client.max(1),
                idle_timeout: limits.idle_timeout,
                started: Instant::now(),
                registry: Mutex::new(Registry::default()),
                tally: Mutex::new(Tally::default()),
            }),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        lock(&self.state.registry).open.len()
    }

    /// Logs refusals since the last call (every 10 s from the server).
    pub fn report(&self) {
        self.state.report();
    }
}

impl<S> Accept<TcpStream, S> for ConnectionGate {
    type Stream = GuardedStream;
    type Service = TrackedService<S>;
    type Future = Ready<io::Result<(GuardedStream, TrackedService<S>)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let admitted = stream
            .peer_addr()
            .and_then(|peer: SocketAddr| self.state.admit(peer.ip()));
        std::future::ready(admitted.map(|conn| {
            (
                GuardedStream {
                    inner: stream,
                    conn: conn.clone(),
                    gate: self.state.clone(),
                    timer: Box::pin(tokio::time::sleep(self.state.idle_timeout)),
                },
                TrackedService {
                    inner: service,
                    conn,
                },
            )
        }))
    }
}

/// A TCP stream that ends (reads EOF) once its connection has been idle
/// too long or was closed to make room, and gives back its place when
/// dropped.
#[derive(Debug)]
pub struct GuardedStream {
    inner: TcpStream,
    conn: Arc<Conn>,
    gate: Arc<GateState>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl GuardedStream {
    /// `Ready` when the connection is to close now.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        *lock(&self.conn.waker) = Some(cx.waker().clone());
        loop {
            if self.conn.closing.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            let idle = self.gate.idle_timeout;
            let now = tokio::time::Instant::now();
            let deadline = if self.conn.busy.load(Ordering::SeqCst) > 0 {
                now + idle
            } else {
                let idle_for = Duration::from_millis(
                    self.conn
                        .now_ms()
                        .saturating_sub(self.conn.idle_since.load(Ordering::SeqCst)),
                );
                if idle_for >= idle {
                    if self.conn.begin_close() {
                        lock(&self.gate.registry).closing += 1;
                        lock(&self.gate.tally).idle_closed += 1;
                    }
                    return Poll::Ready(());
                }
                now + (idle - idle_for)
            };
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.gate.release(&self.conn);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.closing.load(Ordering::SeqCst) {
            // End of stream: TLS and HTTP above close the connection.
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => match this.poll_closing(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks its connection busy from a request's start until its response
/// body is sent or dropped.
#[derive(Debug)]
struct BusyGuard {
    conn: Arc<Conn>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.conn.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.conn
                .idle_since
                .store(self.conn.now_ms(), Ordering::SeqCst);
            // The stream's timer counts from now.
            self.conn.wake();
        }
    }
}

/// A connection's service, counting its requests in flight.
#[derive(Debug, Clone)]
pub struct TrackedService<S> {
    inner: S,
    conn: Arc<Conn>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ReqBody> tower_service::Service<Request<ReqBody>> for TrackedService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body + Unpin,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.conn.busy.fetch_add(1, Ordering::SeqCst);
        let guard = BusyGuard {
            conn: self.conn.clone(),
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its connection busy until sent or dropped.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _guard: BusyGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_of(a), client_of(b));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn calls_are_cut_and_made_inert() {
        assert_eq!(call_text("GET", "/a", 80), "GET /a");
        let long = format!("/{}", "é".repeat(100));
        let cut = call_text("GET", &long, 80);
        assert!(cut.ends_with('…') && cut.len() <= 4 + 80 + 3, "{cut}");
        assert_eq!(call_text("GET", "/a\u{202e}b", 80), "GET /a?b");
    }

    #[test]
    fn refused_calls_past_the_key_budget_share_one_row() {
        let log = RefusedLog::default();
        for i in 0..MAX_REFUSED_KEYS + 100 {
            log.note(None, "anonymous", "GET", &format!("/api/v1/admin/{i}"), 401);
        }
        let counts = lock(&log.counts);
        assert_eq!(counts.len(), MAX_REFUSED_KEYS + 1);
        let catch_all = counts.iter().find(|(k, _)| k.source == "*").unwrap();
        assert_eq!(catch_all.1.0, 100);
    }

    #[test]
    fn a_rate_of_zero_is_no_limit_and_others_refuse_with_a_wait() {
        let none: Rate<String> = Rate::per_second(0, 2);
        assert!((0..10_000).all(|_| none.take(&"a".into(), 1).is_ok()));
        let hourly: Rate<String> = Rate::per_hour(10);
        assert!(hourly.take(&"a".into(), 10).is_ok());
        assert!(matches!(hourly.take(&"a".into(), 1), Err(Some(_))));
        assert!(hourly.take(&"b".into(), 1).is_ok(), "per key");
        assert_eq!(
            hourly.take(&"c".into(), 11),
            Err(None),
            "more than a whole hour"
        );
    }
}
