# shellcheck shell=bash
# Shared helpers for the launchers (sourced, not run).
# DRY_RUN=1 prints each command instead of running it.

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Quote a command line for a remote shell.
quote_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "${out# }"
}
