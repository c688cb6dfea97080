/**
 * Change-feed streams that resume by themselves: {@link ResumableWatch}, what
 * `PartnerClient.watchAppointments()` and `PartnerClient.watchConsentRequests()` return.
 *
 * Call `open()` (it resolves once the stream is *live*: the server sent its headers, so changes
 * that commit from then on reach it), list what you keep in sync, then iterate with `for await`.
 * Iterating without `open()` opens the stream first.
 *
 * Resumption, as in the Python client:
 *
 * - opening retries UNAVAILABLE (backoff with full jitter, never sooner than the server's `RetryInfo`);
 * - a live stream that ends with UNAVAILABLE (a server restart or shutdown, reason
 *   `SERVER_SHUTTING_DOWN`; the database away) or RESOURCE_EXHAUSTED/`STREAM_TOO_SLOW` is reopened
 *   with the last {@link ResumableWatch.resumeToken}, on whichever server the address reaches: the
 *   server replays every change after it, exactly once and in order, so the iteration goes on
 *   without a gap or a repeat;
 * - a watch keeps trying for `resumeTimeoutMs` (60 s by default) without a live stream, however
 *   many attempts that takes, then throws the last error. The retry policy's backoffs shape the
 *   waits; its `maxAttempts` bounds unary calls only. `resumeTimeoutMs: 0` throws at the first failure;
 * - `watchAppointments` asks for bookmarks: the server sends one as soon as the stream has caught
 *   up, then whenever it has been quiet for a while, and a last one when it shuts down. A bookmark
 *   is never yielded; its token becomes {@link ResumableWatch.resumeToken}, so even a watch opened
 *   without a token that has received no change yet resumes exactly;
 * - a stream that ends before it gave the watch any token (no event, no bookmark), when it was
 *   opened without one, cannot resume without a gap: its error is thrown (list again, then watch
 *   again); so is any other error (PERMISSION_DENIED/`ACCESS_REVOKED`, UNAUTHENTICATED for a
 *   revoked key, OUT_OF_RANGE, …).
 *
 * A watch has no deadline; HTTP/2 PINGs (every 60 s while a stream is open) detect a dead connection.
 *
 * @module
 */

import { Code } from "@connectrpc/connect";

import { toApptgateError, type ApptgateError } from "./errors.js";
import { resumeDelayMs, sleep, type RetryEvent, type RetryPolicy } from "./retry.js";

/** The `ErrorInfo` reason of a stream the server ended because its reader fell behind (resumable). */
export const STREAM_TOO_SLOW = "STREAM_TOO_SLOW";
/** The `ErrorInfo` reason of a stream the server ended because it is stopping (resumable, elsewhere or once back). */
export const SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN";
/** How long a watch keeps trying to get a live stream back before it throws, unless told otherwise. */
export const DEFAULT_RESUME_TIMEOUT_MS = 60_000;

/** Whether a stream that ended with `error` may be reopened with its last resume token. */
export function resumable(error: ApptgateError): boolean {
  return error.code === Code.Unavailable || (error.code === Code.ResourceExhausted && error.reason === STREAM_TOO_SLOW);
}

/** Starts one stream of a watch: the call, from `resumeToken`, aborted by `signal`; `onHeader` when live. */
export type StreamOpener<E> = (
  resumeToken: string,
  options: { readonly signal: AbortSignal; readonly onHeader: () => void },
) => AsyncIterable<E>;

/** How a {@link ResumableWatch} resumes, beyond its retry policy. */
export interface ResumeOptions<E> {
  /** How long the watch keeps trying to get a live stream back before it throws the last error (default 60 s). */
  readonly resumeTimeoutMs?: number;
  /** Events the watch keeps to itself (bookmarks): their token is kept, they are never yielded. */
  readonly skip?: (event: E) => boolean;
}

interface OpenStream<E> {
  readonly iterator: AsyncIterator<E>;
  readonly abort: AbortController;
  /** The first read, started while waiting for the headers. */
  first: Promise<IteratorResult<E>> | undefined;
}

/**
 * A live server stream that resumes after transient ends: an `AsyncIterable` of the events. See
 * the module documentation. `resumeToken` is the token of the last event received, to store once
 * you applied it. Throws {@link ApptgateError}s.
 */
export class ResumableWatch<E extends { readonly resumeToken: string }> implements AsyncIterable<E> {
  #resumeToken: string;
  /** Sends since the last event received: the backoff grows with it. */
  #attempt = 0;
  /** When the watch lost its last live stream (`performance.now()`), or undefined while one is live. */
  #outageSince: number | undefined;
  #stream: OpenStream<E> | undefined;
  #closed = false;
  readonly #resumeTimeoutMs: number;
  readonly #skip: ((event: E) => boolean) | undefined;

  /** Throws a RangeError when `resume.resumeTimeoutMs` is negative or not a number. */
  constructor(
    /** The RPC, for example "WatchAppointments". */
    readonly method: string,
    private readonly openStream: StreamOpener<E>,
    resumeToken: string,
    private readonly retry: RetryPolicy,
    private readonly onRetry?: (event: RetryEvent) => void,
    resume: ResumeOptions<E> = {},
  ) {
    this.#resumeToken = resumeToken;
    this.#resumeTimeoutMs = resume.resumeTimeoutMs ?? DEFAULT_RESUME_TIMEOUT_MS;
    if (!(this.#resumeTimeoutMs >= 0)) {
      throw new RangeError("resumeTimeoutMs must be a number of milliseconds, 0 or more");
    }
    this.#skip = resume.skip;
  }

  /** The resume token of the last event received (or the one the watch started from). */
  get resumeToken(): string {
    return this.#resumeToken;
  }

  /** Opens the stream and resolves once it is live. Retries UNAVAILABLE; throws other errors. */
  async open(): Promise<void> {
    this.#closed = false;
    this.#drop();
    for (;;) {
      this.#attempt++;
      const abort = new AbortController();
      let live!: () => void;
      const headers = new Promise<void>((resolve) => (live = resolve));
      const iterator = this.openStream(this.#resumeToken, { signal: abort.signal, onHeader: () => live() })[
        Symbol.asyncIterator
      ]();
      const first = iterator.next();
      try {
        // Resolves when the server sent its headers; rejects when the call failed before (trailers only).
        await Promise.race([headers, first]);
        this.#stream = { iterator, abort, first };
        this.#outageSince = undefined;
        return;
      } catch (thrown) {
        abort.abort();
        const error = toApptgateError(thrown, this.#attempt);
        const delay = this.#delay(error, false);
        if (delay === undefined || this.#closed) throw error;
        await this.#wait(error, delay);
        if (this.#closed) return;
      }
    }
  }

  /** Ends the stream; an iteration in progress ends (without an error). */
  close(): void {
    this.#closed = true;
    this.#drop();
  }

  /** The next event; `done` once the watch is closed or the server ended the stream normally. */
  async next(): Promise<IteratorResult<E, undefined>> {
    for (;;) {
      if (this.#closed) return { done: true, value: undefined };
      if (this.#stream === undefined) {
        await this.open();
        continue;
      }
      const stream = this.#stream;
      let result: IteratorResult<E>;
      try {
        const pending = stream.first ?? stream.iterator.next();
        stream.first = undefined;
        result = await pending;
      } catch (thrown) {
        if (this.#closed) return { done: true, value: undefined };
        const error = toApptgateError(thrown, this.#attempt);
        const delay = this.#delay(error, true);
        if (delay === undefined) {
          this.#drop();
          throw error;
        }
        this.#drop();
        await this.#wait(error, delay);
        continue;
      }
      if (result.done) {
        this.close();
        return { done: true, value: undefined };
      }
      this.#resumeToken = result.value.resumeToken;
      this.#attempt = 0;
      this.#outageSince = undefined;
      if (this.#skip?.(result.value)) continue;
      return { done: false, value: result.value };
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<E, undefined> {
    return {
      next: () => this.next(),
      return: async () => {
        this.close();
        return { done: true, value: undefined };
      },
    };
  }

  /** The wait before reopening after `error`, or `undefined` to throw it. */
  #delay(error: ApptgateError, live: boolean): number | undefined {
    const now = performance.now();
    this.#outageSince ??= now;
    if (live && !this.#resumeToken) return undefined; // reopening "from now" would skip what committed meanwhile
    if (!resumable(error)) return undefined;
    const remainingMs = this.#resumeTimeoutMs - (now - this.#outageSince);
    return resumeDelayMs(this.retry, error, Math.max(this.#attempt, 1), remainingMs);
  }

  async #wait(error: ApptgateError, delayMs: number): Promise<void> {
    this.onRetry?.({ method: this.method, error, attempt: this.#attempt, delayMs });
    await sleep(delayMs);
  }

  #drop(): void {
    if (this.#stream !== undefined) {
      this.#stream.abort.abort();
      this.#stream = undefined;
    }
  }
}
