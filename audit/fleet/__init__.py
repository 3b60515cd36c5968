"""The demo fleet: real services on loopback, instrumented with the OpenTelemetry SDK and the
official instrumentation, losing context in the ways production does, with ground truth
recorded out of band (docs/scenarios.md, "The demo fleet")."""
