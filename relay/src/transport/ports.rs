//! The media UDP port range: one port per peer connection, handed out and taken back.
//! With the UDP mux (`media.udp_mux_port`) the pool hands out placeholders instead: see
//! [`PortPool::muxed`].

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;

/// Free ports of the configured range.
#[derive(Debug)]
pub struct PortPool {
    ip: IpAddr,
    free: Mutex<BTreeSet<u16>>,
    /// Every peer connection shares the mux port (see [`super::mux`]).
    muxed: bool,
}

/// A port taken from the pool; give it back with [`PortPool::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(pub u16);

impl PortPool {
    /// All ports of `min..=max` on `ip`.
    pub fn new(ip: IpAddr, min: u16, max: u16) -> PortPool {
        PortPool {
            ip,
            free: Mutex::new((min..=max).collect()),
            muxed: false,
        }
    }

    /// A pool for mux mode: never runs out, and hands out `ip:0`, the placeholder the
    /// `webrtc` crate binds (and the mux's runtime closes at once) to name the host
    /// candidate's address.
    pub fn muxed(ip: IpAddr) -> PortPool {
        PortPool {
            ip,
            free: Mutex::new(BTreeSet::new()),
            muxed: true,
        }
    }

    /// Takes the lowest free port that can be bound right now (ports held by other
    /// programs are skipped and stay in the pool for later). `None` when every port
    /// is in use.
    pub fn acquire(&self) -> Option<(Lease, SocketAddr)> {
        if self.muxed {
            return Some((Lease(0), SocketAddr::new(self.ip, 0)));
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let candidates: Vec<u16> = free.iter().copied().collect();
        for port in candidates {
            let addr = SocketAddr::new(self.ip, port);
            // Probe: the peer connection binds it again a moment later.
            if UdpSocket::bind(addr).is_ok() {
                free.remove(&port);
                return Some((Lease(port), addr));
            }
        }
        None
    }

    /// Returns a port to the pool.
    pub fn release(&self, lease: Lease) {
        if self.muxed {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.insert(lease.0);
    }

    /// Ports not in use (`usize::MAX` in mux mode).
    pub fn available(&self) -> usize {
        if self.muxed {
            return usize::MAX;
        }
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_each_port_once_and_takes_it_back() {
        let pool = PortPool::new(IpAddr::from([127, 0, 0, 1]), 47010, 47012);
        let a = pool.acquire().expect("a port");
        let b = pool.acquire().expect("a port");
        assert_ne!(a.0, b.0);
        let c = pool.acquire();
        // A port may be held by another program on a shared machine; when all three
        // were free, the fourth request must fail.
        if let Some(c) = c {
            assert!(pool.acquire().is_none());
            pool.release(c.0);
        }
        pool.release(a.0);
        assert!(pool.acquire().is_some());
    }
}
