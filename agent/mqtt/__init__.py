"""Everything MQTT, in one place: topic names (`topics`), the payload codec (`wire`), TLS and broker
credentials (`tls`), the daemon's connection (`link`, with `session` and `routes`), its result spool
(`spool`) and the small client the operator tools and the delivery tests use (`client`).

Importing this package imports nothing: `topics` and `wire` stay free of paho, so that code which only
needs names or the codec (commands, delivery) does not pull in the network stack."""
