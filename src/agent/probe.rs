//! Checks that a port is free on this node's network stack by binding it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use portassign_api::Protocol;

/// Says whether a port is free on the node. The seam lets tests declare ports busy.
pub trait PortProbe: Send + Sync {
    /// True when `port` can be bound for `protocol` on every wildcard address the node has.
    fn is_free(&self, port: u16, protocol: Protocol) -> bool;
}

/// Binds the real sockets, for TCP and/or UDP, and closes them again at once. Where the
/// node has IPv6, one dual-stack socket bound to `[::]` (IPV6_V6ONLY off) checks both
/// families in one bind: Linux refuses it when any IPv4 or IPv6 address holds the port.
/// Without IPv6, the IPv4 wildcard `0.0.0.0` is bound.
#[derive(Clone, Debug)]
pub struct SocketProbe {
    dual_stack: bool,
}

impl SocketProbe {
    /// A probe that binds the dual-stack wildcard when this host can, else IPv4's.
    pub fn detect() -> Self {
        Self { dual_stack: bind(0, true, Type::STREAM, SockProtocol::TCP).is_ok() }
    }

    /// Whether the probe also covers IPv6 (through a dual-stack socket).
    pub fn checks_ipv6(&self) -> bool {
        self.dual_stack
    }
}

impl PortProbe for SocketProbe {
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        // Both sockets are held until both are bound: TCPUDP must be free for both at once.
        let tcp = if protocol.tcp() {
            match bind(port, self.dual_stack, Type::STREAM, SockProtocol::TCP) {
                Ok(socket) => Some(socket),
                Err(_) => return false,
            }
        } else {
            None
        };
        let udp_free = !protocol.udp() || bind(port, self.dual_stack, Type::DGRAM, SockProtocol::UDP).is_ok();
        drop(tcp);
        udp_free
    }
}

/// Binds `port` on the wildcard address: `[::]` dual-stack, or `0.0.0.0`. No
/// `SO_REUSEADDR`: a port with connections still in TIME_WAIT counts as busy, which errs
/// on the safe side.
fn bind(port: u16, dual_stack: bool, ty: Type, proto: SockProtocol) -> io::Result<Socket> {
    let (domain, addr) = if dual_stack {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    };
    let socket = Socket::new(domain, ty.cloexec(), Some(proto))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
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
        let holder = Socket::new(Domain::IPV6, Type::STREAM, None).and_then(|socket| {
            socket.set_only_v6(true)?;
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
            Ok(socket)
        });
        let Ok(socket) = holder else {
            // A host without IPv6: the probe must know it and bind IPv4 only.
            assert!(!probe.checks_ipv6(), "IPv6 cannot be bound here, yet the probe thinks it can");
            return;
        };
        assert!(probe.checks_ipv6(), "IPv6 can be bound here, yet the probe does not check it");
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        assert!(!probe.is_free(port, Protocol::Tcp));
    }

    #[test]
    fn ipv6_loopback_and_ipv4_loopback_udp_holders_are_seen() {
        let probe = probe();
        if probe.checks_ipv6() {
            let v6 = TcpListener::bind("[::1]:0").unwrap();
            assert!(!probe.is_free(v6.local_addr().unwrap().port(), Protocol::Tcp));
        }
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!probe.is_free(udp.local_addr().unwrap().port(), Protocol::TcpUdp));
    }

    #[test]
    fn an_outgoing_connections_local_port_is_busy() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        assert!(!probe().is_free(client.local_addr().unwrap().port(), Protocol::Tcp));
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
