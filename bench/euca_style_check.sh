#!/usr/bin/env bash
# A euca-style smoke check of an EC2-API cloud, API steps only, the way such
# checks are usually scripted: one `aws ec2 ...` process per step.
#
#   bench/euca_style_check.sh ENDPOINT REGION IMAGE [POLL_INTERVAL] [MAX_POLLS]
#
# keypair, image, security group, tcp/22 ingress, run instance, wait for
# running, terminate, wait for terminated, revoke, delete group, delete
# keypair. Credentials come from the environment (testing/testing when unset,
# which is what moto wants). Both waits are bounded in polls and in seconds.
# On failure, whatever was created is removed (best effort) and the exit
# status is non-zero. Prints the number of `aws` calls on stderr at the end.
set -euo pipefail

if [ $# -lt 3 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

ENDPOINT=$1
REGION=$2
IMAGE=$3
POLL_INTERVAL=${4:-1.0}
MAX_POLLS=${5:-60}
# Wall-clock bound of each wait, in whole seconds.
WAIT_BOUND=${WAIT_BOUND:-120}

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_DEFAULT_REGION=$REGION
export AWS_PAGER=""

NAME="euca-check-$$-$RANDOM"
# Calls are counted in a file: most run in a $(...) subshell.
CALLS_FILE=$(mktemp)
KEY_FILE=""
GROUP_ID=""
INSTANCE_ID=""
RULE=""
DONE=""

ec2() {
    echo >>"$CALLS_FILE"
    aws --endpoint-url "$ENDPOINT" --region "$REGION" --output text ec2 "$@"
}

cleanup() {
    local status=$?
    if [ -z "$DONE" ]; then
        echo "euca_style_check: failed (status $status), cleaning up" >&2
        [ -n "$INSTANCE_ID" ] && ec2 terminate-instances --instance-ids "$INSTANCE_ID" >/dev/null 2>&1 || true
        [ -n "$RULE" ] && ec2 revoke-security-group-ingress --group-id "$GROUP_ID" --protocol tcp --port 22 --cidr 0.0.0.0/0 >/dev/null 2>&1 || true
        [ -n "$GROUP_ID" ] && ec2 delete-security-group --group-id "$GROUP_ID" >/dev/null 2>&1 || true
        [ -n "$KEY_FILE" ] && ec2 delete-key-pair --key-name "$NAME" >/dev/null 2>&1 || true
    fi
    [ -n "$KEY_FILE" ] && rm -f "$KEY_FILE"
    echo "euca_style_check: $(wc -l <"$CALLS_FILE") aws calls" >&2
    rm -f "$CALLS_FILE"
    exit "$status"
}
trap cleanup EXIT

# wait_for_state ID STATE: poll describe-instances, at most MAX_POLLS times
# and WAIT_BOUND seconds, POLL_INTERVAL seconds apart.
wait_for_state() {
    local id=$1 want=$2 state="" polls=0 deadline=$((SECONDS + WAIT_BOUND))
    while [ "$polls" -lt "$MAX_POLLS" ] && [ "$SECONDS" -le "$deadline" ]; do
        polls=$((polls + 1))
        state=$(ec2 describe-instances --instance-ids "$id" \
            --query 'Reservations[0].Instances[0].State.Name')
        if [ "$state" = "$want" ]; then
            return 0
        fi
        sleep "$POLL_INTERVAL"
    done
    echo "euca_style_check: $id still '$state' after $polls polls, wanted $want" >&2
    return 1
}

KEY_FILE=$(mktemp)
ec2 create-key-pair --key-name "$NAME" --query KeyMaterial >"$KEY_FILE"

found=$(ec2 describe-images --image-ids "$IMAGE" --query 'Images[0].ImageId')
[ "$found" = "$IMAGE" ] || { echo "euca_style_check: no image $IMAGE" >&2; exit 1; }

GROUP_ID=$(ec2 create-security-group --group-name "$NAME" \
    --description "euca-style check $NAME" --query GroupId)

ec2 authorize-security-group-ingress --group-id "$GROUP_ID" \
    --protocol tcp --port 22 --cidr 0.0.0.0/0 >/dev/null
RULE=yes

INSTANCE_ID=$(ec2 run-instances --image-id "$IMAGE" --instance-type t3.micro \
    --key-name "$NAME" --security-group-ids "$GROUP_ID" --count 1 \
    --query 'Instances[0].InstanceId')

wait_for_state "$INSTANCE_ID" running

ec2 terminate-instances --instance-ids "$INSTANCE_ID" >/dev/null
wait_for_state "$INSTANCE_ID" terminated
INSTANCE_ID=""

ec2 revoke-security-group-ingress --group-id "$GROUP_ID" \
    --protocol tcp --port 22 --cidr 0.0.0.0/0 >/dev/null
RULE=""

ec2 delete-security-group --group-id "$GROUP_ID" >/dev/null
GROUP_ID=""

ec2 delete-key-pair --key-name "$NAME" >/dev/null
DONE=yes
echo "euca_style_check: passed ($NAME)" >&2
