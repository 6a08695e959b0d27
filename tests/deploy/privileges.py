"""What every deployment in deploy/ grants Stoker, shared by the tests of each: it runs as
root so that actions can run under slot uids of their own, and keeps only these capabilities
(README, "Running as root", says what each is for).

No CAP_DAC_READ_SEARCH: for root, CAP_DAC_OVERRIDE already bypasses every read, write and
search check on files and directories (execute too, where any execute bit is set), so an
action's 0700 directories and 0000 files are readable and removable without it. Leaving it
out keeps the set within Docker's (and so Fargate's) default set and within the Pod Security
Standards' baseline level."""

CAPABILITIES = frozenset({"SETUID", "SETGID", "CHOWN", "FOWNER", "DAC_OVERRIDE", "KILL"})
# Their bit numbers (linux/capability.h), to read a process's CapEff.
CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6,
                   "SETUID": 7}
# Docker's default set for a container (moby's oci/caps/defaults.go), which Fargate grants
# too and which ECS's linuxParameters.capabilities.drop subtracts from.
DOCKER_DEFAULT = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                            "MKNOD", "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID",
                            "SETPCAP", "SETUID", "SYS_CHROOT"})
# What the Pod Security Standards' baseline level lets a container add (every other
# capability needs the privileged level).
BASELINE_ADDABLE = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID",
                              "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID",
                              "SETPCAP", "SETUID", "SYS_CHROOT"})
# The default of executor.yaml's action_uids, which no deployment overrides.
ACTION_UIDS = range(60000, 61000)
