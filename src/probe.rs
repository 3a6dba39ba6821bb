//! Checks that a port is free on this node's network stack by binding it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::api::Protocol;

/// Says whether a port is free on the node. The seam lets tests declare ports busy.
pub trait PortProbe: Send + Sync {
    /// True when `port` can be bound for `protocol` on every wildcard address the node has.
    fn is_free(&self, port: u16, protocol: Protocol) -> bool;
}

/// Binds the real sockets: the wildcard IPv4 address and, when the node has IPv6, the
/// wildcard IPv6 address (IPv6-only, so both families are checked on their own), for
/// TCP and/or UDP. The sockets are closed again at once.
#[derive(Clone, Debug)]
pub struct SocketProbe {
    ipv6: bool,
}

impl SocketProbe {
    /// A probe that checks IPv6 too when this host can bind an IPv6 socket.
    pub fn detect() -> Self {
        Self { ipv6: ipv6_available() }
    }

    /// Whether the probe also binds the IPv6 wildcard address.
    pub fn checks_ipv6(&self) -> bool {
        self.ipv6
    }
}

impl PortProbe for SocketProbe {
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        let families: &[bool] = if self.ipv6 { &[false, true] } else { &[false] };
        let kinds =
            [(protocol.tcp(), Type::STREAM, SockProtocol::TCP), (protocol.udp(), Type::DGRAM, SockProtocol::UDP)];
        // Hold every socket until all are bound: the port must be free for all at once.
        let mut held = Vec::with_capacity(4);
        for &v6 in families {
            for &(wanted, ty, proto) in &kinds {
                if !wanted {
                    continue;
                }
                match bind(port, v6, ty, proto) {
                    Ok(socket) => held.push(socket),
                    Err(_) => return false,
                }
            }
        }
        true
    }
}

/// Binds `port` on the wildcard address of one family. No `SO_REUSEADDR`: a port with
/// connections still in TIME_WAIT counts as busy, which errs on the safe side.
fn bind(port: u16, v6: bool, ty: Type, proto: SockProtocol) -> io::Result<Socket> {
    let (domain, addr) = if v6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    };
    let socket = Socket::new(domain, ty.cloexec(), Some(proto))?;
    if v6 {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn ipv6_available() -> bool {
    bind(0, true, Type::STREAM, SockProtocol::TCP).is_ok()
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), if readable.
pub fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u16>());
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    fn probe() -> SocketProbe {
        SocketProbe::detect()
    }

    #[test]
    fn a_listening_tcp_port_is_busy_for_tcp_but_free_for_udp() {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!probe().is_free(port, Protocol::Tcp));
        assert!(!probe().is_free(port, Protocol::TcpUdp));
        // Another process might take the UDP port in between; retry is not needed on a quiet host.
        assert!(probe().is_free(port, Protocol::Udp));
    }

    #[test]
    fn a_port_bound_on_loopback_only_is_busy() {
        // The seed only checked 127.0.0.1; the wildcard bind must see a loopback holder too.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!probe().is_free(port, Protocol::Tcp));
    }

    #[test]
    fn a_bound_udp_port_is_busy_for_udp() {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!probe().is_free(port, Protocol::Udp));
    }

    #[test]
    fn an_ipv6_only_holder_is_seen_when_the_host_has_ipv6() {
        let probe = probe();
        if !probe.checks_ipv6() {
            // Nothing to check on a host without IPv6; the IPv4 tests above still run.
            return;
        }
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        socket.set_only_v6(true).unwrap();
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into()).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        assert!(!probe.is_free(port, Protocol::Tcp));
    }

    #[test]
    fn a_free_port_is_free_and_left_free() {
        let port = {
            let l = TcpListener::bind("0.0.0.0:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(probe().is_free(port, Protocol::TcpUdp));
        // The probe closed its sockets: the port can be bound again.
        assert!(TcpListener::bind(("0.0.0.0", port)).is_ok());
    }
}
