//! The kubelet's gRPC clients name a Unix socket by its path, and grpc-go then sends that
//! path as the HTTP/2 `:authority` (the kubelet's plugin registration does:
//! `/var/lib/kubelet/plugins_registry/<driver>-reg.sock`). A path is not a URI authority,
//! and h2, under tonic, resets such a stream as malformed (`PROTOCOL_ERROR`; hyperium/h2
//! issue 487), so the kubelet never learns the plugin is there.
//!
//! This front sits between the socket the kubelet dials and the gRPC server: it relays
//! each connection byte for byte, except the header blocks the client sends, which it
//! decodes (HPACK), gives `localhost` as `:authority` when theirs is not a valid
//! authority, and encodes again. Nothing else is touched; the server's side passes
//! through unchanged.

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's least).
const MAX_FRAME: usize = 16_384;
/// Buffer of each in-process pipe to the gRPC server.
const PIPE: usize = 64 * 1024;
/// The authority a Unix socket's client means.
const LOCALHOST: &[u8] = b"localhost";

/// Accepts connections on `listener` until `shutdown`, and hands the gRPC server one end
/// of an in-process pipe per connection (through `server`), relaying the other end.
pub(crate) async fn front(
    listener: UnixListener,
    server: mpsc::Sender<io::Result<DuplexStream>>,
    shutdown: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(error) => {
                    tracing::warn!(%error, "accept on the kubelet's socket failed");
                    continue;
                }
            },
        };
        let (ours, theirs) = tokio::io::duplex(PIPE);
        if server.send(Ok(theirs)).await.is_err() {
            return;
        }
        tokio::spawn(async move {
            if let Err(error) = relay(client, ours).await {
                tracing::debug!(%error, "connection from the kubelet ended");
            }
        });
    }
}

async fn relay(client: UnixStream, server: DuplexStream) -> io::Result<()> {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(server);
    let up = async {
        let result = rewrite(&mut from_client, &mut to_server).await;
        let _ = to_server.shutdown().await;
        result
    };
    let down = async {
        let result = tokio::io::copy(&mut from_server, &mut to_client).await.map(|_| ());
        let _ = to_client.shutdown().await;
        result
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// A header block being read: its HEADERS frame and the CONTINUATIONs after it.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Copies an HTTP/2 client's byte stream from `from` to `to`, header blocks rewritten.
pub(crate) async fn rewrite<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(invalid("not an HTTP/2 connection preface".into()));
    }
    to.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut encoder = Encoder::new();
    let mut open: Option<Block> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(error),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = [head[5], head[6], head[7], head[8]];
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        let complete = match (kind, open.as_mut()) {
            (HEADERS, None) => {
                let mut body = payload.as_slice();
                if flags & PADDED != 0 {
                    let (&pad, rest) = body.split_first().ok_or_else(|| invalid("empty padded HEADERS".into()))?;
                    body =
                        rest.get(..rest.len().wrapping_sub(pad.into())).ok_or_else(|| invalid("bad padding".into()))?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let (p, rest) = body.split_at_checked(5).ok_or_else(|| invalid("short HEADERS".into()))?;
                    body = rest;
                    Some(p.try_into().expect("five bytes"))
                } else {
                    None
                };
                open = Some(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: body.to_vec() });
                flags & END_HEADERS != 0
            }
            (CONTINUATION, Some(block)) if block.stream == stream => {
                block.fragment.extend_from_slice(&payload);
                flags & END_HEADERS != 0
            }
            (HEADERS | CONTINUATION, _) => return Err(invalid("header block out of order".into())),
            (_, Some(_)) => return Err(invalid("frame inside a header block".into())),
            (_, None) => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        };
        if complete {
            let block = open.take().expect("an open block");
            to.write_all(&reencode(&block, &mut decoder, &mut encoder)?).await?;
        }
    }
}

/// The frames of `block` with its `:authority` made valid.
fn reencode(block: &Block, decoder: &mut Decoder<'_>, encoder: &mut Encoder<'_>) -> io::Result<Vec<u8>> {
    let headers = decoder.decode(&block.fragment).map_err(|error| invalid(format!("HPACK: {error}")))?;
    let headers: Vec<(Vec<u8>, Vec<u8>)> = headers
        .into_iter()
        .map(|(name, value)| {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                (name, LOCALHOST.to_vec())
            } else {
                (name, value)
            }
        })
        .collect();
    let mut fragment = block.priority.map(|p| p.to_vec()).unwrap_or_default();
    fragment.extend(encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))));
    let mut frames = Vec::with_capacity(fragment.len() + 9);
    let chunks: Vec<&[u8]> = if fragment.is_empty() { vec![&[]] } else { fragment.chunks(MAX_FRAME).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, mut flags) = if i == 0 {
            let mut flags = if block.end_stream { END_STREAM } else { 0 };
            if block.priority.is_some() {
                flags |= PRIORITY;
            }
            (HEADERS, flags)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        let len = (chunk.len() as u32).to_be_bytes();
        frames.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
        frames.extend_from_slice(&block.stream);
        frames.extend_from_slice(chunk);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits a byte stream (after the preface) into (kind, flags, payload) frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            out.push((bytes[3], bytes[4], bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn through(input: Vec<u8>) -> Vec<u8> {
        let mut output = Vec::new();
        rewrite(&mut input.as_slice(), &mut output).await.expect("rewrite");
        output
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_is_untouched() {
        let mut client = Encoder::new();
        let path = b"/var/lib/kubelet/plugins_registry/ports.portassign.io-reg.sock".as_slice();
        let request = [
            (b":method".as_slice(), b"POST".as_slice()),
            (b":scheme", b"http"),
            (b":path", b"/pluginregistration.Registration/GetInfo"),
            (b":authority", path),
            (b"content-type", b"application/grpc"),
        ];
        let block = client.encode(request);
        // Split over a HEADERS and a CONTINUATION, padded, with a priority.
        let (a, b) = block.split_at(7);
        let mut headers = vec![2u8];
        headers.extend_from_slice(&[0, 0, 0, 0, 16]);
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0]);
        let settings = frame(0x4, 0, 0, &[]);
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(&data);
        // A second request on the same connection: the decoder's table carries over.
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &client.encode(request)));

        let output = through(input).await;
        assert_eq!(&output[..24], PREFACE);
        let frames = frames(&output[24..]);
        assert_eq!(frames.len(), 4, "settings, headers, data, headers: {frames:?}");
        assert_eq!(frames[0], (0x4, 0, vec![]));
        assert_eq!(frames[2], (0x0, END_STREAM, vec![0, 0, 0, 0, 0]));
        let mut server = Decoder::new();
        for (i, end_stream) in [(1, 0), (3, END_STREAM)] {
            let (kind, flags, payload) = &frames[i];
            assert_eq!(*kind, HEADERS);
            let priority = if i == 1 { PRIORITY } else { 0 };
            assert_eq!(*flags, END_HEADERS | end_stream | priority);
            let block = if i == 1 { &payload[5..] } else { &payload[..] };
            let decoded = server.decode(block).expect("the server decodes what the front encoded");
            let authority = decoded.iter().find(|(n, _)| n == b":authority").map(|(_, v)| v.as_slice());
            assert_eq!(authority, Some(LOCALHOST));
            let others: Vec<_> = decoded.iter().filter(|(n, _)| n != b":authority").cloned().collect();
            let wanted: Vec<_> =
                request.iter().filter(|(n, _)| *n != b":authority").map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            assert_eq!(others, wanted);
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut client = Encoder::new();
        let block = client.encode([(b":authority".as_slice(), b"localhost:8080".as_slice())]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let output = through(input).await;
        let (_, _, payload) = &frames(&output[24..])[0];
        let decoded = Decoder::new().decode(payload).unwrap();
        assert_eq!(decoded, [(b":authority".to_vec(), b"localhost:8080".to_vec())]);
    }

    #[tokio::test]
    async fn a_frame_inside_a_header_block_is_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, &[]));
        let mut output = Vec::new();
        let error = rewrite(&mut input.as_slice(), &mut output).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
