"""The monitor child: /healthz, /readyz and /statusz on health_listen, Prometheus /metrics on
metrics_listen. It reads what the other processes leave behind (status files, metric mmap
files, the CAS index) and never talks to them, so it cannot slow an action down."""
