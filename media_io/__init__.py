"""Media I/O: fetching a job's input under the URL policy, and the job workspace (local or S3)."""
