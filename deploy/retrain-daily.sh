#!/bin/sh
# ctrstream-retrain-daily: run `ctrstream retrain` (the day before, UTC) every day at
# $RETRAIN_AT_UTC (HH:MM, default 01:30), for compose or any host without a cron daemon.
# A failed retrain is logged and the loop waits for the next day: the model version
# published before stays current. A retrain still running at the next HH:MM delays that
# day's run instead of overlapping it. Installed in the image as ctrstream-retrain-daily.
set -u
at="${RETRAIN_AT_UTC:-01:30}"
case "$at" in
  [01][0-9]:[0-5][0-9] | 2[0-3]:[0-5][0-9]) ;;
  *) echo "ctrstream-retrain-daily: RETRAIN_AT_UTC=$at: expected HH:MM" >&2; exit 2 ;;
esac
while :; do
  now=$(date -u +%s)
  next=$(date -u -d "today $at" +%s)
  [ "$next" -gt "$now" ] || next=$(date -u -d "tomorrow $at" +%s)
  echo "ctrstream-retrain-daily: next retrain at $(date -u -d "@$next" '+%Y-%m-%d %H:%M') UTC"
  sleep $((next - now))
  ctrstream retrain || echo "ctrstream-retrain-daily: retrain failed (exit $?)" >&2
done
