"""The reference transfer for benches/remote.sh: boto3's managed transfers (the AWS CLI's engine,
multipart and threaded: 8 MB parts, 10 threads) of a directory to or from an S3 prefix, timed
inside Python so that the interpreter's start-up is not counted.

    python ref_s3.py push DIR s3://BUCKET/PREFIX
    python ref_s3.py pull s3://BUCKET/PREFIX DIR

Prints the seconds the transfer took. Endpoint and credentials from the AWS environment.
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3


def split(url):
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def main():
    action, src, dst = sys.argv[1:4]
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    # Several files at once, as the AWS CLI's `cp --recursive` does (each large one in threads too).
    pool = ThreadPoolExecutor(max_workers=10)
    started = time.perf_counter()
    if action == "push":
        bucket, prefix = split(dst)
        jobs = []
        for root, _, files in os.walk(src, followlinks=True):
            for name in files:
                path = os.path.join(root, name)
                key = f"{prefix}/{os.path.relpath(path, src)}"
                jobs.append(pool.submit(s3.upload_file, path, bucket, key))
    else:
        bucket, prefix = split(src)
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                for o in page.get("Contents", [])]
        jobs = []
        for key in keys:
            path = os.path.join(dst, os.path.relpath(key, prefix))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            jobs.append(pool.submit(s3.download_file, bucket, key, path))
    for job in jobs:
        job.result()
    print(f"{time.perf_counter() - started:.4f}")


if __name__ == "__main__":
    main()
