#!/bin/sh
# A station's user and permissions on the RabbitMQ cluster (docs/cluster.md), the
# equivalent of provisioning/broker/acl's station patterns:
#
#   station-permissions.sh SITE NAME [PREFIX]
#
# The user is the certificate CN "SITE/NAME" (mqtt.ssl_cert_login, no password). It may
# publish only its own records, status, telemetry, command results and photo blobs, and
# read only its own ack, commands, blob resend requests and the signed datasets.
# RabbitMQ matches routing keys: MQTT's "/" is "." there. RABBITMQCTL may name another
# rabbitmqctl command line (e.g. "rabbitmqctl -n rabbit@mq2").
set -eu
site=${1:?usage: station-permissions.sh SITE NAME [PREFIX]}
name=${2:?usage: station-permissions.sh SITE NAME [PREFIX]}
prefix=${3:-madoguchi/v1}
case "$site$name" in
*[!a-z0-9_-]*) echo "station-permissions.sh: site and name are [a-z0-9_-] (as madoguchi enroll makes them)" >&2; exit 2 ;;
esac
ctl=${RABBITMQCTL:-rabbitmqctl}
user="$site/$name"
# the prefix as a routing-key regex: "/" -> ".", dots escaped
p=$(printf '%s' "$prefix" | sed 's/\./\\./g; s#/#\\.#g')
me="$p\\.$site\\.$name"

if ! $ctl list_users --quiet | cut -f1 | grep -qxF "$user"; then
  # a random password, cleared at once: the certificate is the only way in
  $ctl add_user "$user" "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >/dev/null
  $ctl clear_password "$user" >/dev/null
fi
# resources: its own MQTT subscription queues (named after the client id, which the
# agent makes "<site>-<name>"-free to choose, so any mqtt-subscription- queue), and
# amq.topic to publish on and bind from
$ctl set_permissions -p / "$user" \
  '^mqtt-subscription-.*' '^(amq\.topic|mqtt-subscription-.*)$' '^(amq\.topic|mqtt-subscription-.*)$' >/dev/null
# topics: what it may publish (write) and subscribe to (read)
$ctl set_topic_permissions -p / "$user" amq.topic \
  "^$me\\.(records|status|telemetry|cmd\\.[^.]+\\.result|blobs\\.[^.]+\\.[^.]+)\$" \
  "^($me\\.(ack|cmd\\..+|blobs\\.[^.]+\\.missing)|$p\\._datasets\\..+)\$" >/dev/null
echo "$user: permissions set"
