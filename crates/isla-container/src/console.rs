//! The terminal of a foreground `run` or `exec` without --console-socket: the init sends the
//! pseudo-terminal master to the runtime, which copies between it and its own stdin/stdout
//! (raw mode while it does, when stdin is a terminal).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Copies terminal I/O until the process ends; restores the terminal when dropped.
pub struct Relay {
    saved: Option<Termios>,
}

impl Relay {
    /// Start copying between the master and this process's stdio.
    pub fn start(master: OwnedFd) -> Relay {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            termios::cfmakeraw(&mut raw);
            let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        }
        let master = std::fs::File::from(master);
        if let Ok(mut to_master) = master.try_clone() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut input = std::io::stdin();
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 || to_master.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
        let mut from_master = master;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            while let Ok(n) = from_master.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        });
        Relay { saved }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, t);
        }
    }
}
