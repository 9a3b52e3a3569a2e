//! The device event loop: one epoll instance, one thread, handlers keyed by [`Token`].
//!
//! Handlers are `FnMut(events)` closures; devices capture an `Arc<Mutex<worker>>` in them. The
//! handler table is only locked to look a handler up, never while a handler runs, so a handler
//! may add or remove handlers (its own included). A removed handler is never called again, but
//! one that is running when another thread removes it finishes that call: devices guard their
//! state with an "active" flag checked under their worker lock.
//!
//! Remove a token *before* closing its fd: `remove` issues `EPOLL_CTL_DEL` on the fd number it
//! was given, which must not have been reused by then.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::lock;
use crate::queue::VirtQueue;
use crate::rate_limiter::RateLimiter;

/// Readable (`EPOLLIN`).
pub const EV_IN: u32 = libc::EPOLLIN as u32;
/// Writable (`EPOLLOUT`).
pub const EV_OUT: u32 = libc::EPOLLOUT as u32;
/// Edge-triggered (`EPOLLET`).
pub const EV_EDGE: u32 = libc::EPOLLET as u32;
/// Peer closed its writing end (`EPOLLRDHUP`).
pub const EV_RDHUP: u32 = libc::EPOLLRDHUP as u32;
/// Hang-up (`EPOLLHUP`, always reported).
pub const EV_HUP: u32 = libc::EPOLLHUP as u32;
/// Error (`EPOLLERR`, always reported).
pub const EV_ERR: u32 = libc::EPOLLERR as u32;

/// Identifies one registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u64);

type Handler = Box<dyn FnMut(u32) + Send>;

/// Reserved token of the stop EventFd.
const STOP: u64 = 0;

struct Entry {
    fd: RawFd,
    handler: Arc<Mutex<Handler>>,
}

struct Inner {
    epoll: Epoll,
    handlers: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    stop: EventFd,
}

/// The loop itself; [`run`](Self::run) it on its own thread.
pub struct EventLoop {
    inner: Arc<Inner>,
}

/// Adds and removes handlers, from any thread; also stops the loop.
#[derive(Clone)]
pub struct EventLoopHandle {
    inner: Arc<Inner>,
}

impl EventLoop {
    /// Creates the epoll instance and its stop EventFd.
    pub fn new() -> io::Result<(EventLoop, EventLoopHandle)> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP))?;
        let inner =
            Arc::new(Inner { epoll, handlers: Mutex::new(HashMap::new()), next: AtomicU64::new(STOP + 1), stop });
        Ok((EventLoop { inner: inner.clone() }, EventLoopHandle { inner }))
    }

    /// Dispatches events until [`EventLoopHandle::stop`]; then drops every handler (which breaks
    /// the reference cycles between devices and the loop, closing their fds).
    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); 64];
        'outer: loop {
            let n = match self.inner.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("event loop: epoll_wait: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == STOP {
                    break 'outer;
                }
                let handler = lock(&self.inner.handlers).get(&token).map(|e| e.handler.clone());
                let Some(handler) = handler else { continue };
                let mut h = lock(&handler);
                if catch_unwind(AssertUnwindSafe(|| (*h)(ev.events()))).is_err() {
                    tracing::error!("event loop: handler {token} panicked; it is removed");
                    drop(h);
                    EventLoopHandle { inner: self.inner.clone() }.remove(Token(token));
                }
            }
        }
        let handlers = std::mem::take(&mut *lock(&self.inner.handlers));
        for entry in handlers.values() {
            let _ = self.inner.epoll.ctl(ControlOperation::Delete, entry.fd, EpollEvent::default());
        }
        drop(handlers);
    }
}

impl EventLoopHandle {
    /// Watches `fd` for `events` (`EV_*` bits) and calls `handler` with the events that fired.
    pub fn add(&self, fd: RawFd, events: u32, handler: Box<dyn FnMut(u32) + Send>) -> io::Result<Token> {
        let token = self.inner.next.fetch_add(1, Ordering::Relaxed);
        // The handler is in the table before epoll can report the fd.
        lock(&self.inner.handlers).insert(token, Entry { fd, handler: Arc::new(Mutex::new(handler)) });
        let ev = EpollEvent::new(EventSet::from_bits_truncate(events), token);
        if let Err(e) = self.inner.epoll.ctl(ControlOperation::Add, fd, ev) {
            lock(&self.inner.handlers).remove(&token);
            return Err(e);
        }
        Ok(Token(token))
    }

    /// Changes the events watched for a registration.
    pub fn modify(&self, token: Token, events: u32) -> io::Result<()> {
        let fd = lock(&self.inner.handlers).get(&token.0).map(|e| e.fd);
        let Some(fd) = fd else { return Err(io::Error::from(io::ErrorKind::NotFound)) };
        self.inner.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(EventSet::from_bits_truncate(events), token.0),
        )
    }

    /// Stops watching; the handler is dropped (after its current call, if one is running).
    pub fn remove(&self, token: Token) {
        let entry = lock(&self.inner.handlers).remove(&token.0);
        if let Some(entry) = entry {
            if let Err(e) = self.inner.epoll.ctl(ControlOperation::Delete, entry.fd, EpollEvent::default()) {
                tracing::debug!("event loop: removing fd {}: {e}", entry.fd);
            }
        }
    }

    /// Makes [`EventLoop::run`] return.
    pub fn stop(&self) {
        if let Err(e) = self.inner.stop.write(1) {
            tracing::error!("event loop: stop: {e}");
        }
    }

    /// Number of registered handlers (for tests and diagnostics).
    pub fn len(&self) -> usize {
        lock(&self.inner.handlers).len()
    }

    /// True when no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tokens of one device activation; dropping it removes them all.
pub(crate) struct Registrations {
    handle: EventLoopHandle,
    tokens: Vec<Token>,
}

impl Registrations {
    pub(crate) fn new(handle: EventLoopHandle) -> Self {
        Registrations { handle, tokens: Vec::new() }
    }

    /// Registers `fd` with a handler that locks `worker` and calls `f` on it.
    pub(crate) fn add<W: Send + 'static>(
        &mut self,
        fd: RawFd,
        events: u32,
        worker: &Arc<Mutex<W>>,
        f: impl Fn(&mut W, u32) + Send + 'static,
    ) -> io::Result<Token> {
        let w = worker.clone();
        let token = self.handle.add(fd, events, Box::new(move |ev| f(&mut lock(&w), ev)))?;
        self.tokens.push(token);
        Ok(token)
    }

    /// Registers a queue's kick EventFd and, with a rate limiter, its timer: both run `process`
    /// (the kick after draining the EventFd, the timer after unblocking the limiter).
    pub(crate) fn add_queue<W: Send + 'static>(
        &mut self,
        worker: &Arc<Mutex<W>>,
        queue: fn(&mut W) -> &mut VirtQueue,
        limiter: fn(&mut W) -> Option<&mut RateLimiter>,
        process: fn(&mut W),
    ) -> io::Result<()> {
        let (kick_fd, timer_fd) = {
            let mut w = lock(worker);
            (queue(&mut w).evt.as_raw_fd(), limiter(&mut w).map(|l| l.timer_fd()))
        };
        self.add(kick_fd, EV_IN, worker, move |w, _| {
            queue(w).drain_kick();
            process(w);
        })?;
        if let Some(fd) = timer_fd {
            self.add(fd, EV_IN, worker, move |w, _| {
                if let Some(l) = limiter(w) {
                    l.on_timer();
                }
                process(w);
            })?;
        }
        Ok(())
    }
}

/// A device worker that can be told to stop touching its queues.
pub(crate) trait DeviceWorker: Send + 'static {
    /// Called at reset, under the worker's lock; afterwards no handler may use the queues.
    fn stop(&mut self);
}

/// A running device: its worker and the worker's registrations.
pub(crate) struct Activation<W: DeviceWorker> {
    pub(crate) worker: Arc<Mutex<W>>,
    _regs: Registrations,
}

impl<W: DeviceWorker> Activation<W> {
    pub(crate) fn new(worker: Arc<Mutex<W>>, regs: Registrations) -> Self {
        Activation { worker, _regs: regs }
    }
}

/// Stops a device's worker (if running) and removes its handlers.
pub(crate) fn deactivate<W: DeviceWorker>(active: &mut Option<Activation<W>>) {
    if let Some(a) = active.take() {
        lock(&a.worker).stop();
        // Dropping `a` removes the registrations.
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        for t in self.tokens.drain(..) {
            self.handle.remove(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn handlers_fire_and_removal_stops_them() {
        let (el, h) = EventLoop::new().unwrap();
        let t = std::thread::spawn(move || el.run());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let e2 = evt.try_clone().unwrap();
        let token = h
            .add(
                evt.as_raw_fd(),
                EV_IN,
                Box::new(move |ev| {
                    let _ = e2.read();
                    tx.send(ev).unwrap();
                }),
            )
            .unwrap();
        evt.write(1).unwrap();
        let ev = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_ne!(ev & EV_IN, 0);
        assert_eq!(h.len(), 1);
        h.remove(token);
        assert!(h.is_empty());
        evt.write(1).unwrap();
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "removed handler ran");
        h.stop();
        t.join().unwrap();
    }

    #[test]
    fn a_panicking_handler_is_dropped_and_the_loop_goes_on() {
        let (el, h) = EventLoop::new().unwrap();
        let t = std::thread::spawn(move || el.run());
        let bad = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        h.add(bad.as_raw_fd(), EV_IN, Box::new(|_| panic!("handler bug"))).unwrap();
        bad.write(1).unwrap();
        let good = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let g2 = good.try_clone().unwrap();
        h.add(
            good.as_raw_fd(),
            EV_IN,
            Box::new(move |_| {
                let _ = g2.read();
                let _ = tx.send(());
            }),
        )
        .unwrap();
        good.write(1).unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(h.len(), 1, "the panicking handler was removed");
        h.stop();
        t.join().unwrap();
        assert!(h.is_empty(), "run() drops the handlers when it ends");
    }
}
