//! WebSocket upgrades, taken from actix-http's HTTP/1 dispatcher: check the subscriber, encode the 101, hand it and the bare socket to the hub.
//!
//! actix-http calls this for every request that asks for `Upgrade: websocket`, instead of
//! the actix-web routes; everything else stays with them. Taking the socket here is what
//! lets a session run without the dispatcher's buffers (see `herald_hub::transport`).

use actix_codec::Encoder;
use actix_codec::Framed;
use actix_http::body::{BodySize, MessageBody};
use actix_http::h1::{Codec, Message};
use actix_http::{ConnectionType, Method, Request, Response, ws};
use actix_service::{ServiceFactory, fn_service};
use actix_web::ResponseError;
use actix_web::rt::net::TcpStream;
use actix_web::web::Data;
use bytes::Bytes;
use futures_util::SinkExt;
use herald_hub::Upgraded;
use percent_encoding::percent_decode_str;

use crate::error::ApiError;
use crate::routes::AppState;
use crate::routes::subscribe::{self, Subscription};

/// The upgrade service one HTTP worker runs. The socket's kernel settings came with it
/// from the listener (`socket::tune`).
pub fn service(
    state: Data<AppState>,
) -> impl ServiceFactory<
    (Request, Framed<TcpStream, Codec>),
    Config = (),
    Response = (),
    Error = actix_http::Error,
    InitError = (),
> {
    fn_service(move |(req, framed): (Request, Framed<TcpStream, Codec>)| {
        let state = state.clone();
        async move {
            match accept(&state, &req) {
                Ok((subscription, response)) => open(&state, subscription, response, framed),
                Err(refused) => refuse(framed, &refused).await,
            }
            Ok(())
        }
    })
}

/// The checks of `GET /ws/{user}`, in the order the routes make them, and the 101.
fn accept(state: &AppState, req: &Request) -> Result<(Subscription, Response<()>), ApiError> {
    let user = req
        .path()
        .strip_prefix("/ws/")
        .filter(|user| !user.contains('/'))
        .ok_or(ApiError::NotFound)?;
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed { allow: "GET" });
    }
    // Not UTF-8 once decoded: the id check refuses the replacement characters.
    let user = percent_decode_str(user).decode_utf8_lossy();
    let subscription = subscribe::check(state, &user, req.uri().query().unwrap_or_default())?;
    let response = ws::handshake(req.head())
        .map_err(|_| ApiError::NotWebSocket)?
        .message_body(())
        .map_err(|_| ApiError::NotWebSocket)?;
    Ok((subscription, response))
}

/// Encodes the 101 and gives it to a new session on this worker with the socket (and
/// anything the peer sent after its handshake): the session sends it with its `hello`.
fn open(
    state: &AppState,
    subscription: Subscription,
    response: Response<()>,
    framed: Framed<TcpStream, Codec>,
) {
    let mut parts = framed.into_parts();
    if parts
        .codec
        .encode(
            Message::Item((response, BodySize::None)),
            &mut parts.write_buf,
        )
        .is_err()
    {
        return;
    }
    let Subscription { user, since } = subscription;
    let upgraded = Upgraded {
        stream: parts.io,
        read_ahead: parts.read_buf,
        // A copy of its size: the codec's buffer has room for far more, and every
        // connecting session would hold that until its first write.
        handshake: Bytes::copy_from_slice(&parts.write_buf),
    };
    let session = state.hub.open_session(user.clone(), since, upgraded);
    tracing::debug!(user = %user, session = %session, since = ?since, "subscribed");
}

/// Answers a refused upgrade with the same JSON error a route would, then hangs up.
async fn refuse(mut framed: Framed<TcpStream, Codec>, refused: &ApiError) {
    let (mut head, body) = Response::from(refused.error_response()).into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    let Ok(body) = body.try_into_bytes() else {
        return;
    };
    let len = body.len() as u64;
    let _ = framed
        .send(Message::Item((head, BodySize::Sized(len))))
        .await;
    let _ = framed.send(Message::Chunk(Some(body))).await;
    let _ = framed.send(Message::Chunk(None)).await;
}
