//! The forwarder process, `relay-bench udp-forwarder`: one blocking UDP socket on
//! 127.0.0.1, one thread, [`Fanout`] for the routing. Each turn reads up to `--batch`
//! datagrams with one `recvmmsg`, and sends every copy they route with as few
//! `sendmmsg` calls as the kernel allows. No ICE, DTLS, SRTP or RTCP: what is left is
//! the cost of moving packets through the kernel, the floor any relay pays.
//!
//! It prints `listening on udp 127.0.0.1:PORT` when ready, and exits when its standard
//! input closes (so it never outlives the bench that started it).
//!
//! `recvmmsg` comes from `nix` (rustix has none); `sendmmsg` from rustix, whose call
//! returns how many messages went out (nix's makes that count read address slots that
//! sending never fills).

use std::io::{IoSlice, IoSliceMut, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use clap::Args;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrIn, recvmmsg};
use rustix::net::{
    MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, addr::SocketAddrArg, sendmmsg,
};

use super::fanout::{Fanout, Route};

/// Largest datagram read (RTP of the bench is at most 1200 bytes).
const DATAGRAM: usize = 2048;
/// Socket buffers asked for (the kernel caps them at `net.core.{r,w}mem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Options of the hidden `relay-bench udp-forwarder` command.
#[derive(Debug, Clone, Args)]
pub struct ForwarderArgs {
    /// UDP port on 127.0.0.1 (0: a free one; the first line of stdout says which).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Datagrams read per `recvmmsg`.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,
}

/// Runs the forwarder until its standard input closes (then the process exits) or the
/// socket fails.
pub fn serve(args: &ForwarderArgs) -> std::io::Result<()> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, args.port))?;
    rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER)?;
    rustix::net::sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on udp {}", socket.local_addr()?)?;
        out.flush()?;
    }
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    });

    let batch = usize::from(args.batch);
    let mut fanout = Fanout::new();
    let mut buffers = vec![[0u8; DATAGRAM]; batch];
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(batch, None);
    // Per turn: (length, sender) of each datagram read.
    let mut received: Vec<(usize, Option<SocketAddrV4>)> = Vec::with_capacity(batch);
    // Per turn: where each copy goes (kept between turns: it borrows nothing).
    let mut destinations: Vec<SocketAddrAny> = Vec::new();
    let mut controls: Vec<SendAncillaryBuffer<'static, 'static, 'static>> = Vec::new();
    loop {
        received.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            match recvmmsg(
                socket.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(messages) => {
                    received.extend(messages.map(|m| (m.bytes, m.address.map(SocketAddrV4::from))))
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }

        destinations.clear();
        let mut payloads: Vec<[IoSlice<'_>; 1]> = Vec::new();
        for (buffer, &(len, from)) in buffers.iter().zip(&received) {
            let Some(from) = from else { continue };
            let datagram = &buffer[..len.min(DATAGRAM)];
            match fanout.route(from, datagram) {
                Route::Forward(to) => {
                    for addr in to {
                        destinations.push(addr.as_any());
                        payloads.push([IoSlice::new(datagram)]);
                    }
                }
                // Registrations and stats: rare, and answered before any RTP of this
                // turn goes out, so a receiver's `OK` comes before its first packet.
                Route::Reply(answer) => {
                    let _ = socket.send_to(&answer, from);
                }
                Route::Drop => {}
            }
        }
        if payloads.is_empty() {
            continue;
        }
        controls.resize_with(payloads.len(), SendAncillaryBuffer::default);
        let mut messages: Vec<MMsgHdr<'_>> = destinations
            .iter()
            .zip(&payloads)
            .zip(controls.iter_mut())
            .map(|((addr, payload), control)| MMsgHdr::new_with_addr(addr, payload, control))
            .collect();
        let (mut sent, mut refused) = (0u64, 0u64);
        let mut next = 0;
        while next < messages.len() {
            match sendmmsg(&socket, &mut messages[next..], SendFlags::empty()) {
                Ok(0) => break,
                Ok(n) => {
                    sent += n as u64;
                    next += n;
                }
                Err(rustix::io::Errno::INTR) => {}
                // The message at `next` was refused (e.g. no buffer space): skip it.
                Err(_) => {
                    refused += 1;
                    next += 1;
                }
            }
        }
        refused += (messages.len() - next) as u64;
        fanout.sent(sent, refused);
    }
}
