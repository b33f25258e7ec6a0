//! `relay-bench customer` and `relay-bench agent`: one native client in one role, on a
//! session WebSocket URL obtained elsewhere (`POST /v1/join`, an accepted invitation, or
//! the `ws_url` of `POST /v1/sessions`), for manual tests and for driving a relay from
//! scripts. Each runs for a while and reports what it saw.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use relay_codec::input::{InputEvent, InputKind};

use crate::client::{
    Agent, AgentOptions, ClientError, Customer, CustomerOptions, FrameSource, insecure_tls,
    tls_trusting_pem_file,
};
use crate::run::DEFAULT_SOURCE;

/// How to reach the relay, for both roles.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The session WebSocket URL, token included (`wss://…/v1/sessions/{id}/ws?token=…`).
    #[arg(long, value_name = "URL")]
    pub ws: String,
    /// PEM certificate to trust (the relay's self-signed `tls/cert.pem`, for example).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Accept any certificate.
    #[arg(long)]
    pub insecure: bool,
    /// How long to stay, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

impl Connection {
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        match (&self.ca, self.insecure) {
            (Some(path), _) => tls_trusting_pem_file(path),
            (None, true) => Ok(insecure_tls()),
            (None, false) => Err(ClientError::Protocol(
                "give --ca FILE (the relay's certificate) or --insecure".into(),
            )),
        }
    }

    fn duration(&self) -> Result<Duration, ClientError> {
        Duration::try_from_secs_f64(self.duration)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ClientError::Protocol(format!("bad --duration {}", self.duration)))
    }
}

/// Options of `relay-bench customer`.
#[derive(Debug, Clone, Args)]
pub struct CustomerArgs {
    /// Where and how long.
    #[command(flatten)]
    pub connection: Connection,
    /// Frames to publish, looped: IVF (VP8, VP9, AV1) or H.264 Annex B; default the
    /// committed VP8 screen fixture.
    #[arg(long, value_name = "FILE")]
    pub source: Option<PathBuf>,
    /// Frames per second.
    #[arg(long, default_value_t = 15.0)]
    pub fps: f64,
}

/// Options of `relay-bench agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Where and how long.
    #[command(flatten)]
    pub connection: Connection,
    /// Mouse moves to send per second (0: none); the relay delivers them only if this
    /// agent has control.
    #[arg(long, default_value_t = 0.0)]
    pub input_hz: f64,
}

/// Publishes until the duration is over; returns the report to print.
pub async fn run_customer(args: &CustomerArgs) -> Result<String, ClientError> {
    let c = &args.connection;
    let source = match &args.source {
        Some(path) => FrameSource::open(path)?,
        None => FrameSource::from_ivf(Bytes::from_static(DEFAULT_SOURCE))?,
    };
    let options = CustomerOptions {
        fps: args.fps,
        ..CustomerOptions::default()
    };
    let customer = Customer::connect(&c.ws, c.tls()?, source, options).await?;
    customer.wait_connected(Duration::from_secs(20)).await?;
    tokio::time::sleep(c.duration()?).await;
    let sent = customer.sent_frames();
    let inputs = customer.input_events();
    let malformed = inputs.iter().filter(|i| i.event.is_err()).count();
    let report = format!(
        "customer: sent {} frames ({} keyframes, {} on request), {} keyframe requests, \
         {} input events received ({} malformed), {} share frames received",
        sent.len(),
        sent.iter().filter(|f| f.is_keyframe).count(),
        sent.iter().filter(|f| f.requested).count(),
        customer.keyframe_request_count(),
        inputs.len(),
        malformed,
        customer.share_frames().len(),
    );
    customer.close().await?;
    Ok(report)
}

/// Watches (and optionally sends input) until the duration is over; returns the report
/// to print, and whether the stream was clean (first frame a keyframe, no frame
/// assembled over a gap, no sequence gaps).
pub async fn run_agent(args: &AgentArgs) -> Result<(String, bool), ClientError> {
    let c = &args.connection;
    let agent = Agent::connect(&c.ws, c.tls()?, AgentOptions::default()).await?;
    agent.wait_connected(Duration::from_secs(20)).await?;
    let deadline = tokio::time::Instant::now() + c.duration()?;
    let mut sent_input = 0u32;
    if args.input_hz > 0.0 {
        agent.wait_input_open(Duration::from_secs(20)).await?;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.input_hz));
        while tokio::time::Instant::now() < deadline {
            tick.tick().await;
            let event = InputEvent {
                seq: sent_input,
                kind: InputKind::MouseMove {
                    x: (sent_input % 65_536) as u16,
                    y: 0,
                },
            };
            agent.send_input(&event).await?;
            sent_input += 1;
        }
    } else {
        tokio::time::sleep_until(deadline).await;
    }
    let frames = agent.frames();
    let stats = agent.receive_stats();
    let broken = frames
        .iter()
        .filter(|f| f.dropped_packets_before > 0)
        .count();
    let first_is_key = frames.first().is_none_or(|f| f.is_keyframe);
    let clean = first_is_key && broken == 0 && stats.sequence_gaps == 0;
    let report = format!(
        "agent: {} frames ({} keyframes, codec {}), {} RTP packets, {} sequence gaps, \
         {} frames after dropped packets, first frame {}a keyframe, {} PLIs sent, \
         {} input events sent",
        frames.len(),
        frames.iter().filter(|f| f.is_keyframe).count(),
        stats.codec.map_or("none".to_owned(), |c| c.to_string()),
        stats.rtp_packets,
        stats.sequence_gaps,
        broken,
        if first_is_key { "" } else { "NOT " },
        stats.plis_sent,
        sent_input,
    );
    agent.close().await?;
    Ok((report, clean))
}
