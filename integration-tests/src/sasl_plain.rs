//! SASL PLAIN for tests. tansu 0.6 offers only SCRAM, so a front of the
//! kind an authenticating proxy is answers the client's SASL handshake and
//! PLAIN authentication itself (Kafka's `SaslHandshake` v1 and
//! `SaslAuthenticate` v0–v1, as librdkafka sends them) and, once the client
//! is authenticated, relays the connection to a plaintext broker as is.
//! Before that only `ApiVersions` is relayed: any other request closes the
//! connection, as a SASL listener does. A wrong user or password gets
//! `SASL_AUTHENTICATION_FAILED` and the connection is closed.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const SASL_AUTHENTICATE: i16 = 36;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// Accepts Kafka clients on `127.0.0.1:<port>`, authenticates them with
/// SASL PLAIN against its users, and relays them to a plaintext backend.
/// Stops when dropped.
pub struct SaslPlainFront {
    /// The port it accepts clients on.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl SaslPlainFront {
    /// Listens on a free port; `users` are `(name, password)` pairs. Each
    /// client is relayed to `127.0.0.1:<backend>` (connected only then, so
    /// the backend may start later).
    pub async fn start(backend: u16, users: &[(&str, &str)]) -> SaslPlainFront {
        let users: Arc<Vec<(String, String)>> = Arc::new(
            users
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let users = users.clone();
                relays.spawn(async move {
                    // A refused or broken client just loses its connection.
                    let _ = serve(client, backend, &users).await;
                });
            }
        });
        SaslPlainFront { port, task }
    }
}

impl Drop for SaslPlainFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client: `ApiVersions` relayed and SASL answered until the client is
/// authenticated, then everything relayed.
async fn serve(mut client: TcpStream, backend: u16, users: &[(String, String)]) -> io::Result<()> {
    let mut server = TcpStream::connect(("127.0.0.1", backend)).await?;
    let mut mechanism_agreed = false;
    loop {
        let request = read_frame(&mut client).await?;
        let mut r = Reader(&request);
        let (api_key, version, correlation_id) = (r.i16()?, r.i16()?, r.i32()?);
        match api_key {
            API_VERSIONS => {
                write_frame(&mut server, &request).await?;
                let response = read_frame(&mut server).await?;
                write_frame(&mut client, &response).await?;
            }
            SASL_HANDSHAKE if version == 1 => {
                r.nullable_string()?; // client id
                mechanism_agreed = r.string()? == b"PLAIN";
                let mut response = correlation_id.to_be_bytes().to_vec();
                let error = if mechanism_agreed {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                response.extend_from_slice(&error.to_be_bytes());
                response.extend_from_slice(&1i32.to_be_bytes());
                response.extend_from_slice(&5i16.to_be_bytes());
                response.extend_from_slice(b"PLAIN");
                write_frame(&mut client, &response).await?;
                if !mechanism_agreed {
                    return Ok(());
                }
            }
            SASL_AUTHENTICATE if mechanism_agreed && version <= 1 => {
                r.nullable_string()?; // client id
                let authenticated = plain_user(r.bytes()?, users);
                let mut response = correlation_id.to_be_bytes().to_vec();
                match &authenticated {
                    Some(_) => {
                        response.extend_from_slice(&0i16.to_be_bytes());
                        response.extend_from_slice(&(-1i16).to_be_bytes());
                    }
                    None => {
                        let message = b"Authentication failed: invalid username or password";
                        response.extend_from_slice(&SASL_AUTHENTICATION_FAILED.to_be_bytes());
                        response.extend_from_slice(&(message.len() as i16).to_be_bytes());
                        response.extend_from_slice(message);
                    }
                }
                response.extend_from_slice(&0i32.to_be_bytes()); // no auth bytes
                if version >= 1 {
                    response.extend_from_slice(&0i64.to_be_bytes()); // session lifetime
                }
                write_frame(&mut client, &response).await?;
                if authenticated.is_none() {
                    return Ok(());
                }
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                return Ok(());
            }
            // Anything else before authentication: refused, as a SASL
            // listener refuses it.
            _ => return Ok(()),
        }
    }
}

/// The user a PLAIN token (`authzid NUL user NUL password`, RFC 4616)
/// names, if the password is theirs and they act for no one else (as
/// Kafka's own PLAIN server: the authzid empty or the user).
fn plain_user<'a>(token: &[u8], users: &'a [(String, String)]) -> Option<&'a str> {
    let mut parts = token.split(|&b| b == 0);
    let (authzid, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !(authzid.is_empty() || authzid == user) {
        return None;
    }
    users
        .iter()
        .find(|(u, p)| u.as_bytes() == user && p.as_bytes() == password)
        .map(|(u, _)| u.as_str())
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let size = usize::try_from(s.read_i32().await?)
        .ok()
        .filter(|&n| n <= 1 << 24)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad frame size"))?;
    let mut frame = vec![0; size];
    s.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(s: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    s.write_all(&(body.len() as i32).to_be_bytes()).await?;
    s.write_all(body).await
}

/// Big-endian fields of a request, front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short request"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i16(&mut self) -> io::Result<i16> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> io::Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> io::Result<&'a [u8]> {
        let n = usize::try_from(self.i16()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "null string"))?;
        self.take(n)
    }

    fn nullable_string(&mut self) -> io::Result<Option<&'a [u8]>> {
        let n = self.i16()?;
        match usize::try_from(n) {
            Ok(n) => self.take(n).map(Some),
            Err(_) => Ok(None),
        }
    }

    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = usize::try_from(self.i32()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "null bytes"))?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::plain_user;

    #[test]
    fn plain_tokens_name_a_user_with_their_password_only() {
        let users = [("carol".to_owned(), "secret".to_owned())];
        assert_eq!(plain_user(b"\0carol\0secret", &users), Some("carol"));
        assert_eq!(plain_user(b"carol\0carol\0secret", &users), Some("carol"));
        for refused in [
            &b"\0carol\0wrong"[..],
            b"\0dave\0secret",
            b"dave\0carol\0secret",
            b"\0carol\0secret\0more",
            b"\0carol",
            b"",
        ] {
            assert_eq!(plain_user(refused, &users), None, "{refused:?}");
        }
    }
}
