/**
 * A partner client of `appointments.partner.v1.PartnerAppointmentService`, speaking gRPC over
 * HTTP/2 with Connect's Node.js transport.
 *
 * It sends the partner key on every call, gives every call a deadline (10 s by default,
 * covering retries), retries UNAVAILABLE with exponential backoff and full jitter (never
 * sooner than the server's `RetryInfo` asks) for every call that only reads, walks pages for
 * you, follows the change feeds with streams that resume by themselves ({@link ResumableWatch}),
 * reads contact details only with a consent token passed explicitly, and throws
 * {@link ApptgateError}s.
 *
 * The two writes, `requestContactAccess` and `cancelConsentRequest`, are sent once: one that
 * failed with UNAVAILABLE may have been applied, and the caller decides (a contact request sent
 * again answers {@link ConsentRequestPending}, naming the one already made).
 *
 * @module
 */

import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import type { Appointment } from "./gen/appointments/partner/v1/appointment_pb.js";
import type { ConsentRequest, ConsentRequestEvent } from "./gen/appointments/partner/v1/consent_request_pb.js";
import type { AppointmentContact, ConsentKey } from "./gen/appointments/partner/v1/contact_pb.js";
import {
  ChangeType,
  ListAppointmentsRequestSchema,
  PartnerAppointmentService,
  RequestContactAccessRequestSchema,
  type AppointmentChange,
  type ListAppointmentsResponse,
} from "./gen/appointments/partner/v1/partner_appointment_service_pb.js";
import type { ContactField } from "./gen/appointments/type/v1/contact_pb.js";
import { toApptgateError, type ConsentRequestPending } from "./errors.js";
import { DEFAULT_RETRY, nextDelayMs, sleep, type RetryEvent, type RetryPolicy } from "./retry.js";
import { ResumableWatch } from "./watch.js";

export { DEFAULT_RETRY, type RetryEvent, type RetryPolicy } from "./retry.js";

export const DEFAULT_TIMEOUT_MS = 10_000;
/** The interval of HTTP/2 PINGs while a call is open, as the Python client's keepalive (a watch has no deadline). */
export const KEEPALIVE_INTERVAL_MS = 60_000;

export interface PartnerClientOptions {
  /**
   * The partner listener: "host:port" for plaintext, or a URL ("https://host:port" for TLS). A watch
   * resumes on whichever server this reaches: to move between the processes of a deployment, give
   * the address of their load balancer (or a name that resolves to each).
   */
  readonly address: string;
  /** The partner key, sent as `authorization: Bearer <key>`. */
  readonly key: string;
  /** The deadline of each call in milliseconds, retries included. */
  readonly timeoutMs?: number;
  readonly retry?: RetryPolicy;
  /** Called before each wait of a retry, or of a watch reopening its stream (for logs). */
  readonly onRetry?: (event: RetryEvent) => void;
}

/** What `watchAppointments` follows. */
export interface AppointmentWatchOptions {
  /** One practitioner's public id; omitted means every practitioner granted to you. */
  readonly practitionerId?: string;
  /** A stored `resumeToken`, to continue after the change (or bookmark) it came with; omitted means from now. */
  readonly resumeToken?: string;
  /** How long the watch keeps trying to get a live stream back before it throws the last error (default 60 s). */
  readonly resumeTimeoutMs?: number;
}

/** Where `watchConsentRequests` starts. */
export interface ConsentRequestWatchOptions {
  /** A stored `resumeToken`, to continue after the event it came with; omitted means from now. */
  readonly resumeToken?: string;
  /** How long the watch keeps trying to get a live stream back before it throws the last error (default 60 s). */
  readonly resumeTimeoutMs?: number;
}

/** A window of appointments: those starting in [startTime, endTime). */
export interface AppointmentQuery {
  readonly startTime: Date;
  readonly endTime: Date;
  /** One practitioner's public id; omitted means every practitioner granted to you. */
  readonly practitionerId?: string;
  /** 0 or omitted means the server's default (50); at most 500. */
  readonly pageSize?: number;
}

function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

function bearer(key: string): Interceptor {
  return (next) => (request) => {
    request.header.set("authorization", `Bearer ${key}`);
    return next(request);
  };
}

export class PartnerClient {
  private readonly sessions: Http2SessionManager;
  private readonly client: Client<typeof PartnerAppointmentService>;
  private readonly timeoutMs: number;
  private readonly retry: RetryPolicy;
  private readonly onRetry: ((event: RetryEvent) => void) | undefined;

  constructor(options: PartnerClientOptions) {
    if (!/^[\x21-\x7e]+$/.test(options.key)) {
      throw new Error("key must be a non-empty string of visible ASCII characters");
    }
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.retry = options.retry ?? DEFAULT_RETRY;
    this.onRetry = options.onRetry;
    const url = baseUrl(options.address);
    // PINGs only while a call is open (the gateway refuses them otherwise), to notice a dead connection
    // under a watch; 20 s to answer, as the Python client's keepalive.
    this.sessions = new Http2SessionManager(url, { pingIntervalMs: KEEPALIVE_INTERVAL_MS, pingTimeoutMs: 20_000 });
    const transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.sessions,
      defaultTimeoutMs: this.timeoutMs,
      interceptors: [bearer(options.key)],
    });
    this.client = createClient(PartnerAppointmentService, transport);
  }

  /** Closes the HTTP/2 connection, so the process can exit. */
  close(): void {
    this.sessions.abort();
  }

  /**
   * Sends `call` with the time left before the deadline; retries UNAVAILABLE unless `idempotent` is false;
   * throws ApptgateError.
   */
  private async send<T>(method: string, call: (timeoutMs: number) => Promise<T>, idempotent = true): Promise<T> {
    const deadline = Date.now() + this.timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await call(Math.max(deadline - Date.now(), 1));
      } catch (thrown) {
        const error = toApptgateError(thrown, attempt);
        const delayMs = idempotent ? nextDelayMs(this.retry, error, attempt, deadline - Date.now()) : undefined;
        if (delayMs === undefined) throw error;
        this.onRetry?.({ method, error, attempt, delayMs });
        await sleep(delayMs);
      }
    }
  }

  /** One page of the appointments starting in the window, in the basic view. */
  listAppointments(query: AppointmentQuery & { readonly pageToken?: string }): Promise<ListAppointmentsResponse> {
    const request = create(ListAppointmentsRequestSchema, {
      practitionerId: query.practitionerId ?? "",
      startTime: timestampFromDate(query.startTime),
      endTime: timestampFromDate(query.endTime),
      pageSize: query.pageSize ?? 0,
      pageToken: query.pageToken ?? "",
    });
    return this.send("ListAppointments", (timeoutMs) => this.client.listAppointments(request, { timeoutMs }));
  }

  /** Every appointment of the window, ordered by start time, fetching pages as needed. */
  async *iterAppointments(query: AppointmentQuery): AsyncGenerator<Appointment> {
    let pageToken = "";
    do {
      const page = await this.listAppointments({ ...query, pageToken });
      yield* page.appointments;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** One appointment in the basic view; NOT_FOUND when it does not exist or is not visible to you. */
  getAppointment(appointmentId: string): Promise<Appointment> {
    return this.send("GetAppointment", (timeoutMs) => this.client.getAppointment({ appointmentId }, { timeoutMs }));
  }

  /**
   * The contact details that `consentToken` releases for this appointment's patient: only the consented
   * fields are set, the others are listed in `withheldFields`. Throws ConsentDenied when the token does not
   * allow it.
   */
  getAppointmentContact(appointmentId: string, consentToken: string): Promise<AppointmentContact> {
    return this.send("GetAppointmentContact", (timeoutMs) =>
      this.client.getAppointmentContact({ appointmentId, consentToken }, { timeoutMs }),
    );
  }

  /** The public keys (PASERK k4.public) that verify consent tokens, the active one first. */
  async listConsentKeys(): Promise<ConsentKey[]> {
    const reply = await this.send("ListConsentKeys", (timeoutMs) => this.client.listConsentKeys({}, { timeoutMs }));
    return reply.keys;
  }

  /**
   * The change feed of your granted practitioners (or one): a {@link ResumableWatch} of `AppointmentChange`s.
   * `await watch.open()` resolves once the stream is live (list the agenda then), `for await` yields the
   * changes and resumes after a server restart or shutdown with the last token, for up to `resumeTimeoutMs`
   * without a live stream; `close()` ends it. The server's bookmarks are never yielded but keep
   * `watch.resumeToken` current: store that. Throws NOT_FOUND (at open) for a practitioner not granted, and a
   * RangeError for a negative `resumeTimeoutMs`.
   */
  watchAppointments(options: AppointmentWatchOptions = {}): ResumableWatch<AppointmentChange> {
    const practitionerId = options.practitionerId ?? "";
    return new ResumableWatch<AppointmentChange>(
      "WatchAppointments",
      (resumeToken, { signal, onHeader }) =>
        this.client.watchAppointments(
          { practitionerId, resumeToken, allowBookmarks: true },
          { signal, onHeader, timeoutMs: 0 },
        ),
      options.resumeToken ?? "",
      this.retry,
      this.onRetry,
      { resumeTimeoutMs: options.resumeTimeoutMs, skip: (change) => change.changeType === ChangeType.BOOKMARK },
    );
  }

  /**
   * Asks the patient of an appointment to release `fields` to you for `ttlMs` milliseconds; resolves to the
   * request, PENDING. `purpose` (1 to 200 characters) and `message` (at most 280) are shown to the patient,
   * who may approve fewer fields or a shorter time. Once approved, the request carries the `consentToken`
   * for {@link getAppointmentContact}. Not retried.
   *
   * Throws {@link ConsentRequestPending} (ALREADY_EXISTS) when a request for the same patient and fields is
   * pending (`error.consentRequestId` names it), RESOURCE_EXHAUSTED (`quotaViolations`, `retryDelayMs`) when your
   * daily requests or the patient's are used up, INVALID_ARGUMENT for a malformed field and NOT_FOUND when
   * the appointment is not visible to you.
   */
  requestContactAccess(
    appointmentId: string,
    fields: readonly ContactField[],
    purpose: string,
    ttlMs: number,
    message = "",
  ): Promise<ConsentRequest> {
    if (!Number.isFinite(ttlMs)) throw new RangeError("ttlMs must be a finite number of milliseconds");
    const request = create(RequestContactAccessRequestSchema, {
      appointmentId,
      fields: [...fields],
      purpose,
      message,
      ttl: durationFromMs(ttlMs),
    });
    return this.send(
      "RequestContactAccess",
      (timeoutMs) => this.client.requestContactAccess(request, { timeoutMs }),
      false,
    );
  }

  /** One of your consent requests; once approved it carries `consentToken`. NOT_FOUND for another partner's or none. */
  getConsentRequest(consentRequestId: string): Promise<ConsentRequest> {
    return this.send("GetConsentRequest", (timeoutMs) =>
      this.client.getConsentRequest({ consentRequestId }, { timeoutMs }),
    );
  }

  /** Cancels one of your pending consent requests; FAILED_PRECONDITION when it is no longer pending. Not retried. */
  cancelConsentRequest(consentRequestId: string): Promise<ConsentRequest> {
    return this.send(
      "CancelConsentRequest",
      (timeoutMs) => this.client.cancelConsentRequest({ consentRequestId }, { timeoutMs }),
      false,
    );
  }

  /**
   * The changes of your consent requests (made, approved, denied, cancelled, expired, consent revoked): a
   * {@link ResumableWatch} of `ConsentRequestEvent`s, resumable like {@link watchAppointments}. A revoked key
   * ends it with UNAUTHENTICATED.
   */
  watchConsentRequests(options: ConsentRequestWatchOptions = {}): ResumableWatch<ConsentRequestEvent> {
    return new ResumableWatch<ConsentRequestEvent>(
      "WatchConsentRequests",
      (resumeToken, { signal, onHeader }) =>
        this.client.watchConsentRequests({ resumeToken }, { signal, onHeader, timeoutMs: 0 }),
      options.resumeToken ?? "",
      this.retry,
      this.onRetry,
      { resumeTimeoutMs: options.resumeTimeoutMs },
    );
  }
}
