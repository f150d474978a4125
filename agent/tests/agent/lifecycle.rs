//! Starting and stopping an agent, without any database or coordinator.
use std::time::Duration;

use flotilla_agent::{AgentConfig, AgentError};

#[tokio::test]
async fn stops_while_still_waiting_for_its_shard() {
    let mut config = AgentConfig::new(
        "s0",
        "postgres://app@127.0.0.1:1/shard_0",
        "http://127.0.0.1:1",
    );
    config.reconnect_min = Duration::from_millis(10);
    config.reconnect_max = Duration::from_millis(50);
    let stop = tokio::time::sleep(Duration::from_millis(200));
    let done =
        tokio::time::timeout(Duration::from_secs(10), flotilla_agent::start(config, stop)).await;
    assert!(matches!(done, Ok(Ok(()))), "{done:?}");
}

#[tokio::test]
async fn refuses_a_bad_configuration() {
    let mut config = AgentConfig::new("s0", "postgres://app:pw@db/x", "http://127.0.0.1:1");
    config.max_connections = 0;
    let err = flotilla_agent::start(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Config { .. }));
    assert_eq!(
        err.to_string(),
        "shard s0: invalid configuration: max_connections must be at least 1"
    );

    let config = AgentConfig::new("s0", "postgres://app:pw@db/x", "not a uri");
    let err = flotilla_agent::start(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("shard s0: coordinator not a uri: "),
        "{err}"
    );
}
