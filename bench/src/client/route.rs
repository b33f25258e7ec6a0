//! Which path a client's media takes: a hook on the addresses of the ICE candidates a
//! client exchanges with the relay.
//!
//! With no [`MediaRoute`] a client announces its own socket and sends to the relay's
//! candidates, as any WebRTC client does. With one, both sides see the addresses the
//! route names instead, so a test can put something between them (an impairing proxy
//! that loses, delays and reorders datagrams, a path that is cut, a second path after a
//! network change) without either end knowing. Only UDP candidates are routed.

use std::fmt;
use std::net::SocketAddr;

/// Maps the addresses of UDP candidates in both directions.
pub trait MediaRoute: Send + Sync + fmt::Debug {
    /// The address announced to the relay for the client's own candidate `local`:
    /// where the relay's datagrams for the client go.
    fn announce_local(&self, local: SocketAddr) -> SocketAddr;
    /// The address the client uses for the relay's candidate `remote`: where the
    /// client's datagrams for the relay go.
    fn reach_remote(&self, remote: SocketAddr) -> SocketAddr;
}

/// `candidate` (an `a=candidate:` value or a trickled `candidate:` string) with its
/// address mapped by `map` when it is a UDP candidate; `None` when it is not one
/// (TCP, malformed), which callers keep unchanged.
pub(crate) fn map_candidate(
    candidate: &str,
    map: impl Fn(SocketAddr) -> SocketAddr,
) -> Option<String> {
    // candidate:<foundation> <component> <transport> <priority> <ip> <port> typ ...
    let mut fields: Vec<&str> = candidate.split(' ').collect();
    if fields.len() < 8 || !fields[2].eq_ignore_ascii_case("udp") {
        return None;
    }
    let addr = SocketAddr::new(fields[4].parse().ok()?, fields[5].parse().ok()?);
    let mapped = map(addr);
    let (ip, port) = (mapped.ip().to_string(), mapped.port().to_string());
    fields[4] = &ip;
    fields[5] = &port;
    Some(fields.join(" "))
}

/// `sdp` with every UDP `a=candidate:` line's address mapped by `map`.
pub(crate) fn map_sdp(sdp: &str, map: impl Fn(SocketAddr) -> SocketAddr) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let mapped = body
            .strip_prefix("a=")
            .and_then(|value| map_candidate(value, &map));
        match mapped {
            Some(value) => {
                out.push_str("a=");
                out.push_str(&value);
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_proxy(_: SocketAddr) -> SocketAddr {
        "127.0.0.9:7000".parse().unwrap()
    }

    #[test]
    fn udp_candidates_are_mapped_and_everything_else_is_kept() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
                   a=candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host\r\n\
                   a=candidate:2 1 tcp 1671430143 127.0.0.1 3479 typ host tcptype passive\r\n\
                   a=mid:0\r\n";
        let mapped = map_sdp(sdp, to_proxy);
        assert_eq!(
            mapped,
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
             a=candidate:1 1 udp 2130706431 127.0.0.9 7000 typ host\r\n\
             a=candidate:2 1 tcp 1671430143 127.0.0.1 3479 typ host tcptype passive\r\n\
             a=mid:0\r\n"
        );
    }

    #[test]
    fn a_trickled_candidate_is_mapped_and_a_malformed_one_is_not() {
        assert_eq!(
            map_candidate(
                "candidate:7 1 UDP 2130706431 ::1 5000 typ host generation 0",
                to_proxy
            )
            .as_deref(),
            Some("candidate:7 1 UDP 2130706431 127.0.0.9 7000 typ host generation 0")
        );
        assert_eq!(
            map_candidate("candidate:7 1 udp 1 nonsense 5000 typ host", to_proxy),
            None
        );
        assert_eq!(map_candidate("candidate:7 1 udp", to_proxy), None);
        assert_eq!(map_candidate("", to_proxy), None);
    }
}
