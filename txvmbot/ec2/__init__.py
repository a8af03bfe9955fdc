"""The EC2 Query API from Twisted: botocore for the models, Twisted's Agent
for the HTTP, and retries of transient errors only.

    client = make_client(reactor, cloud)
    answer = await client.call("DescribeInstances", {"InstanceIds": [iid]})

Importing this package loads neither the reactor nor the botocore model.
"""

from txvmbot.ec2._botocore import ParamError
from txvmbot.ec2.client import EC2Client, make_client
from txvmbot.ec2.retry import is_transient

__all__ = ["EC2Client", "ParamError", "is_transient", "make_client"]
