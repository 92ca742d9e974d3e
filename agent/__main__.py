"""`python -m agent` is `lepton-agent`."""

from agent.cli import agent_main

raise SystemExit(agent_main())
