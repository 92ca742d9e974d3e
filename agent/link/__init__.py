"""The MQTT side of the agent: topics, the connection (`Link`), the result spool and commands."""
